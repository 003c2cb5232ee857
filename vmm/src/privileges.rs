//! Giving up the privileges a VMM needs only to set a VM up. Once its taps and /dev/kvm are
//! open, what it does — run vCPUs, serve its devices and its API, open its disk images again
//! at a guest reboot, write snapshots — needs no capability but reaching files whatever their
//! owner. Capabilities belong to threads, not to the process: each thread that goes on
//! running drops its own, and the threads it starts afterwards (vCPUs, device workers, API
//! workers) start without them. `no_new_privs` keeps any of them from gaining privileges
//! again.

pub use caps::Capability;
use caps::{CapSet, CapsHashSet};

/// The capabilities kept: reading and writing files whatever their owner.
pub const KEPT: &[Capability] = &[
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_DAC_READ_SEARCH,
];

/// Drops every capability but [`KEPT`] from the calling thread (bounding, inheritable,
/// permitted and effective sets) and sets its `no_new_privs`. The threads it starts from now
/// on inherit the rest.
pub fn drop_after_setup() -> Result<(), String> {
    keep_only(KEPT)
}

/// Drops every capability but `keep` from the calling thread, as [`drop_after_setup`] does
/// (for a thread that must keep another capability, or none at all).
pub fn keep_only(keep: &[Capability]) -> Result<(), String> {
    fn fail(what: &'static str) -> impl Fn(caps::errors::CapsError) -> String {
        move |e| format!("cannot {what}: {e}")
    }
    let keep: CapsHashSet = keep.iter().copied().collect();
    // The bounding set first: narrowing it needs CAP_SETPCAP, which goes below (a VMM run
    // without it has nothing there to give up that no_new_privs does not already hold back).
    if caps::has_cap(None, CapSet::Effective, Capability::CAP_SETPCAP).unwrap_or(false) {
        for cap in caps::all() {
            if !keep.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
                caps::drop(None, CapSet::Bounding, cap).map_err(fail("narrow the bounding set"))?;
            }
        }
    }
    caps::set(None, CapSet::Inheritable, &CapsHashSet::new())
        .map_err(fail("clear the inheritable capabilities"))?;
    let permitted = caps::read(None, CapSet::Permitted).map_err(fail("read the capabilities"))?;
    let kept: CapsHashSet = permitted.intersection(&keep).copied().collect();
    caps::set(None, CapSet::Effective, &kept).map_err(fail("drop effective capabilities"))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(fail("drop permitted capabilities"))?;
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integer arguments and touches no memory.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(format!(
            "cannot set no_new_privs: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Descriptors a VMM process may hold (its disks, taps, eventfds and API connections need
/// far fewer): a leak, or a client that opens connection after connection, ends here.
pub const MAX_OPEN_FILES: u64 = 4096;

/// Limits the whole process before it starts any thread (which inherit all of it):
/// `no_new_privs` (nothing it runs gains privileges), at most [`MAX_OPEN_FILES`]
/// descriptors, and no core dumps unless `core_dumps` (guest RAM is left out of them anyway,
/// but device buffers and disk contents pass through the VMM's own memory).
pub fn limit_process(core_dumps: bool) -> Result<(), String> {
    // SAFETY: PR_SET_NO_NEW_PRIVS takes plain integer arguments and touches no memory.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(format!(
            "cannot set no_new_privs: {}",
            std::io::Error::last_os_error()
        ));
    }
    let set = |resource, value: libc::rlim_t, what: &str| {
        let limit = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: setrlimit reads one valid `rlimit`.
        if unsafe { libc::setrlimit(resource, &limit) } != 0 {
            return Err(format!(
                "cannot limit {what}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    };
    if !core_dumps {
        set(libc::RLIMIT_CORE, 0, "core dumps")?;
    }
    let mut files = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` this frame owns.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut files) } != 0 {
        return Err(format!(
            "cannot read the open-file limit: {}",
            std::io::Error::last_os_error()
        ));
    }
    set(
        libc::RLIMIT_NOFILE,
        files.rlim_max.min(MAX_OPEN_FILES as libc::rlim_t),
        "open files",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a thread of its own (capabilities are per thread): afterwards it and the threads it
    /// starts hold only what is kept, and cannot gain more.
    #[test]
    fn a_thread_keeps_only_file_access() {
        std::thread::spawn(|| {
            drop_after_setup().unwrap();
            let check = || {
                let effective = caps::read(None, CapSet::Effective).unwrap();
                let keep: CapsHashSet = KEPT.iter().copied().collect();
                assert!(effective.is_subset(&keep), "{effective:?}");
                assert!(!caps::has_cap(None, CapSet::Bounding, Capability::CAP_NET_ADMIN).unwrap());
                // SAFETY: PR_GET_NO_NEW_PRIVS reads a flag and touches no memory.
                let no_new_privs = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
                assert_eq!(no_new_privs, 1);
                assert!(
                    caps::raise(None, CapSet::Effective, Capability::CAP_NET_ADMIN).is_err(),
                    "a dropped capability cannot come back"
                );
            };
            check();
            std::thread::spawn(check).join().unwrap();
        })
        .join()
        .unwrap();
        // The test's other threads are untouched.
    }
}
