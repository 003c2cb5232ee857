//! Opening `/dev/kvm` with errors a person can act on, and telling hardware KVM from PVM.

use std::path::Path;

use kvm_ioctls::Kvm;

/// Why KVM cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    #[error("/dev/kvm does not exist: this host has no KVM; enable virtualization (VT-x/AMD-V) and load kvm_intel or kvm_amd, or run podvisor inside resources/testhost/run.sh")]
    Missing,
    #[error("permission denied opening /dev/kvm: run podvisor as root or as a member of the group that owns /dev/kvm (usually 'kvm')")]
    PermissionDenied,
    #[error("cannot open /dev/kvm: {0}")]
    Open(kvm_ioctls::Error),
    #[error("/dev/kvm is provided by PVM (kvm_pvm), which runs only PVM-enabled guest kernels; pass --pvm-guest if this kernel is PVM-enabled, or boot it in resources/testhost/run.sh")]
    PvmNeedsPvmGuest,
    #[error("KVM API version {0} is not supported (12 is required)")]
    ApiVersion(i32),
    #[error("KVM lacks a capability podvisor needs: {0}")]
    MissingCap(&'static str),
}

/// Which kind of KVM backs `/dev/kvm`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmFlavor {
    Hardware,
    /// The PVM paravirtual KVM: only PVM-enabled guest kernels run.
    Pvm,
}

/// Tells hardware KVM from PVM by the loaded module.
pub fn flavor() -> KvmFlavor {
    if Path::new("/sys/module/kvm_pvm").exists() {
        KvmFlavor::Pvm
    } else {
        KvmFlavor::Hardware
    }
}

/// Opens `/dev/kvm`. On PVM, refuses unless the caller states the guest kernel is PVM-enabled.
pub fn open(pvm_guest: bool) -> Result<Kvm, KvmError> {
    if flavor() == KvmFlavor::Pvm && !pvm_guest {
        return Err(KvmError::PvmNeedsPvmGuest);
    }
    open_any()
}

/// Opens `/dev/kvm` whatever its flavor (tiny test guests run on PVM too).
pub fn open_any() -> Result<Kvm, KvmError> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => KvmError::Missing,
        libc::EACCES | libc::EPERM => KvmError::PermissionDenied,
        _ => KvmError::Open(e),
    })?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(KvmError::ApiVersion(version));
    }
    for (cap, name) in [
        (kvm_ioctls::Cap::Irqchip, "in-kernel irqchip"),
        (kvm_ioctls::Cap::UserMemory, "user memory"),
        (kvm_ioctls::Cap::SetTssAddr, "TSS address"),
        (kvm_ioctls::Cap::Irqfd, "irqfd"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(KvmError::MissingCap(name));
        }
    }
    Ok(kvm)
}
