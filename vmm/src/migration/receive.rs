//! The destination side of a live migration (see the module docs of [`super`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use std::io::Read;

use devices::block::LockMode;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, ReadVolatile};

use super::protocol::{self, Complete, Hello, Kind};
use super::{Listener, MigrationError, Stream};
use crate::backends::Backends;
use crate::builder;
use crate::config::{NetRetap, VmConfig};
use crate::console::Console;
use crate::persist::MachineState;
use crate::vm::RunningVm;
use crate::vstate::memory;
use crate::vstate::vcpu::CpuTemplate;
use devices::GuestMemoryMmap;

/// A VM that arrived whole and runs here now.
pub struct Received {
    pub config: VmConfig,
    pub console: Console,
    pub backends: Backends,
    pub running: RunningVm,
}

/// Waits on `listener` for one source and receives its VM. On any failure nothing of it is
/// left (no VM, no open backends) and the source is told why.
pub fn receive(
    listener: &Listener,
    kvm: &Kvm,
    template: &CpuTemplate,
    retaps: &[NetRetap],
    host_paths: &crate::host_paths::HostPaths,
) -> Result<Received, MigrationError> {
    let mut stream = listener.accept(super::ACCEPT_TIMEOUT)?;
    let result = receive_on(&mut stream, kvm, template, retaps, host_paths);
    if let Err(e) = &result {
        let _ = protocol::write_frame(&mut stream, Kind::Error, e.to_string().as_bytes());
    }
    result
}

fn expect(frame: &protocol::Frame, kind: Kind) -> Result<(), MigrationError> {
    if frame.kind != kind {
        return Err(MigrationError::Protocol(format!(
            "expected a {kind:?} frame, got {:?}",
            frame.kind
        )));
    }
    Ok(())
}

fn receive_on(
    stream: &mut Stream,
    kvm: &Kvm,
    template: &CpuTemplate,
    retaps: &[NetRetap],
    host_paths: &crate::host_paths::HostPaths,
) -> Result<Received, MigrationError> {
    let frame = protocol::read_frame(stream)?;
    expect(&frame, Kind::Hello)?;
    let hello: Hello = frame.json()?;
    if hello.format != protocol::FORMAT || hello.version != protocol::VERSION {
        return Err(MigrationError::Protocol(format!(
            "{} version {}; this podvisor receives {} version {}",
            hello.format,
            hello.version,
            protocol::FORMAT,
            protocol::VERSION
        )));
    }
    protocol::write_frame(stream, Kind::Ack, &[])?;

    let frame = protocol::read_frame(stream)?;
    expect(&frame, Kind::Config)?;
    let mut config: VmConfig = frame.json()?;
    config
        .validate()
        .map_err(|e| MigrationError::Vm(format!("the VM's configuration: {e}")))?;
    crate::backends::retap(&mut config, retaps).map_err(MigrationError::Vm)?;
    host_paths
        .check_config(&config)
        .map_err(|e| MigrationError::Vm(format!("the VM's configuration: {e}")))?;
    // The machine is built while the source still runs, so that the guest's pause covers
    // only the last pages and the state; its disks are opened now (a disk this host cannot
    // open fails the migration before any memory is sent) and read again at the switch-over.
    let failed =
        |what: &'static str| move |e: crate::Error| MigrationError::Vm(format!("{what}: {e}"));
    let memory = if hello.local {
        // The source's own memory, shared: nothing will be copied.
        let memfd = stream.recv_file()?;
        memory::guest_memory_from_memfd(&memfd, config.memory.size)
    } else {
        memory::create_guest_memory(&config.memory)
    }
    .map_err(|e| MigrationError::Vm(e.to_string()))?;
    let console = Console::new(&config.serial).map_err(|e| failed("the console")(e.into()))?;
    // The source runs the VM still: its disks are shared until the switch-over.
    let mut backends =
        Backends::open(&mut config).map_err(failed("open the VM's disks and taps"))?;
    backends.set_standby_disks(true);
    let vm = builder::build_on(kvm, template, &config, &console, &backends, memory)
        .map_err(failed("build the VM"))?;
    protocol::write_frame(stream, Kind::Ack, &[])?;

    let mut scratch = vec![0u8; CHECK_PIECE];
    // How long memory took to arrive (read straight into guest memory, then checked).
    let (mut receiving, mut checking) = (Duration::ZERO, Duration::ZERO);
    let mut prefault = None;
    let state = loop {
        let header = protocol::read_header(stream)?;
        match header.kind {
            Kind::Memory | Kind::Plan if hello.local => {
                return Err(MigrationError::Protocol(
                    "memory sent although it was handed over (local)".into(),
                ))
            }
            Kind::Plan if prefault.is_none() => {
                let plan: protocol::Plan =
                    protocol::read_payload(stream, header, Vec::new())?.json()?;
                prefault = Some(Prefault::start(vm.memory(), plan.ranges)?);
            }
            Kind::Memory => {
                let at = Instant::now();
                load_frame(stream, header, vm.memory(), &mut scratch, &mut checking)?;
                receiving += at.elapsed();
            }
            Kind::State => {
                break protocol::read_payload(stream, header, Vec::new())?.json::<MachineState>()?
            }
            other => {
                return Err(MigrationError::Protocol(format!(
                    "expected memory or the machine state, got a {other:?} frame"
                )))
            }
        }
    };

    let prefaulted = prefault.map_or(0, Prefault::stop);
    tracing::info!(
        "migration memory: {} ms receiving, of which {} ms checking what arrived; {} MiB \
         faulted in ahead",
        receiving.as_millis(),
        checking.as_millis(),
        prefaulted >> 20
    );
    // The source is paused and its disks are flushed: read their metadata as it is now.
    vm.reload_backends()
        .map_err(failed("read the disks again at the switch-over"))?;
    vm.set_disk_locks(LockMode::Active)
        .map_err(failed("lock the disks at the switch-over"))?;
    backends.set_standby_disks(false);
    let running = vm
        .start_restored(&state)
        .map_err(failed("restore the machine state"))?;
    protocol::write_frame(stream, Kind::Ack, &[])?;

    let frame = protocol::read_frame(stream)?;
    expect(&frame, Kind::Complete)?;
    let complete: Complete = frame.json()?;
    if complete.resume {
        running.resume().map_err(failed("resume the guest"))?;
    }
    // Only once the source has heard that the guest runs here does it stop its own: if it
    // cannot hear it, the guest must not run here.
    if let Err(e) = protocol::write_frame(stream, Kind::Ack, &[]) {
        running.stop();
        return Err(e);
    }
    Ok(Received {
        config,
        console,
        backends,
        running,
    })
}

/// Faults in, on a thread of its own, the guest memory the source's PLAN says its first pass
/// sends, in the order it sends it, so that the receiving thread mostly copies into pages
/// that are already there: first-touch faults (allocating, zeroing and mapping each page)
/// took most of the receiver's time in the emulated test host. The pages would be touched
/// anyway; nothing the source will not send is faulted in. The thread runs at `SCHED_IDLE`:
/// only on a CPU nothing else wants. Stopped (and joined) by
/// [`Prefault::stop`] or when dropped.
struct Prefault {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

/// Bytes faulted in per `madvise`, between checks of the stop flag.
const PREFAULT_PIECE: u64 = 2 << 20;

impl Prefault {
    /// Checks that every range lies inside `memory` (else the stream is refused) and starts
    /// faulting them in.
    fn start(
        memory: &GuestMemoryMmap,
        ranges: Vec<(u64, u64)>,
    ) -> Result<Prefault, MigrationError> {
        let mut pieces = Vec::new();
        for (gpa, len) in ranges {
            let slice = usize::try_from(len)
                .ok()
                .and_then(|len| memory.get_slice(GuestAddress(gpa), len).ok())
                .ok_or_else(|| {
                    MigrationError::Protocol(format!(
                        "a plan's range {gpa:#x}+{len:#x} lies outside the guest's memory"
                    ))
                })?;
            // Guest memory is mapped for the VM's life; `memory` (cloned into the thread)
            // keeps it mapped for the thread's.
            let host = slice.ptr_guard().as_ptr() as usize;
            let mut at = 0;
            while at < len {
                let n = (len - at).min(PREFAULT_PIECE);
                pieces.push((host + at as usize, n as usize));
                at += n;
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let memory = memory.clone();
        let thread = std::thread::Builder::new()
            .name("prefault".into())
            .spawn(move || {
                let _mapped = memory;
                // Work that pays only when a CPU would be idle otherwise: it must not take
                // time from vCPUs (the guest's at the source, on a shared host, or anyone's).
                let param = libc::sched_param { sched_priority: 0 };
                // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param.
                if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
                    tracing::debug!("prefault: SCHED_IDLE: {}", std::io::Error::last_os_error());
                }
                let mut done = 0u64;
                for (addr, len) in pieces {
                    if stopped.load(Ordering::Relaxed) {
                        break;
                    }
                    // SAFETY: [addr, addr+len) lies inside guest memory, which `_mapped`
                    // keeps mapped; MADV_POPULATE_WRITE only faults pages in (as a write
                    // would, without changing their contents).
                    let r = unsafe {
                        libc::madvise(addr as *mut libc::c_void, len, libc::MADV_POPULATE_WRITE)
                    };
                    if r != 0 {
                        // A kernel before 5.14 (EINVAL), or memory short (ENOMEM): the
                        // receiver faults the pages in itself.
                        tracing::debug!("prefault: madvise: {}", std::io::Error::last_os_error());
                        break;
                    }
                    done += len as u64;
                }
                done
            })
            .map_err(|e| MigrationError::Vm(format!("start the prefault thread: {e}")))?;
        Ok(Prefault {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops faulting in; returns how many bytes it did.
    fn stop(mut self) -> u64 {
        self.halt()
    }

    fn halt(&mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().map_or(0, |t| t.join().unwrap_or(0))
    }
}

impl Drop for Prefault {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Bytes of received guest memory read back at a time to be checked. Not less: in the
/// emulated test host, copying and checksumming 64 KiB at a time ran at 33 MiB/s, 1 MiB at a
/// time at 243 MiB/s (glibc copies mid-sized blocks with `rep movsb`, which TCG emulates
/// slowly; big ones with vector stores).
const CHECK_PIECE: usize = 1 << 20;

/// Reads the memory frame `header` began straight into `memory`, range by range, and checks
/// the frame's checksum over what arrived (read back through `scratch`): one copy of each
/// page on its way in. A range outside `memory`, a malformed frame or a bad checksum is
/// refused; whatever was written by then is in a machine that is never run.
fn load_frame(
    input: &mut (impl Read + ReadVolatile),
    header: protocol::Header,
    memory: &GuestMemoryMmap,
    scratch: &mut [u8],
    checked: &mut Duration,
) -> Result<(), MigrationError> {
    const ZEROS: [u8; 4096] = [0; 4096];
    let outside = |gpa: u64, len: usize| {
        MigrationError::Protocol(format!(
            "memory range {gpa:#x}+{len:#x} lies outside the guest's memory"
        ))
    };
    let malformed =
        |what: &str| MigrationError::Protocol(format!("malformed memory frame: {what}"));
    let mut crc = crc32fast::Hasher::new();
    let mut left = header.len as usize;
    let mut head = [0u8; protocol::ENTRY];
    while left > 0 {
        if left < head.len() {
            return Err(malformed("a cut entry"));
        }
        input
            .read_exact(&mut head)
            .map_err(MigrationError::Connection)?;
        crc.update(&head);
        left -= head.len();
        let range = protocol::parse_range_head(&head)?;
        let len = range.len as usize;
        if !range.data {
            let mut at = 0usize;
            while at < len {
                let n = (len - at).min(ZEROS.len());
                let addr = range
                    .gpa
                    .checked_add(at as u64)
                    .ok_or_else(|| outside(range.gpa, len))?;
                memory
                    .write_slice(&ZEROS[..n], GuestAddress(addr))
                    .map_err(|_| outside(range.gpa, len))?;
                at += n;
            }
            continue;
        }
        if len > left {
            return Err(malformed("data past its end"));
        }
        let mut slice = memory
            .get_slice(GuestAddress(range.gpa), len)
            .map_err(|_| outside(range.gpa, len))?;
        input.read_exact_volatile(&mut slice).map_err(|e| match e {
            vm_memory::VolatileMemoryError::IOError(io) => MigrationError::Connection(io),
            other => MigrationError::Connection(std::io::Error::other(other)),
        })?;
        let checking = Instant::now();
        let mut at = 0;
        while at < len {
            let n = (len - at).min(scratch.len());
            let piece = slice.subslice(at, n).map_err(|_| outside(range.gpa, len))?;
            piece.copy_to(&mut scratch[..n]);
            crc.update(&scratch[..n]);
            at += n;
        }
        *checked += checking.elapsed();
        left -= len;
    }
    if crc.finalize() != header.crc32 {
        return Err(MigrationError::Protocol(
            "a Memory frame with a bad checksum (corrupt stream)".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::protocol::MemoryFrame;
    use vm_memory::Bytes;

    /// A memory frame as it travels: header, then payload.
    fn framed(frame: &MemoryFrame) -> Vec<u8> {
        let mut out = Vec::new();
        protocol::write_frame(&mut out, Kind::Memory, frame.payload()).unwrap();
        out
    }

    fn load(bytes: &[u8], memory: &GuestMemoryMmap) -> Result<(), MigrationError> {
        let mut input = bytes;
        let header = protocol::read_header(&mut input)?;
        let mut checked = Duration::ZERO;
        load_frame(&mut input, header, memory, &mut [0u8; 1000], &mut checked)
    }

    #[test]
    fn a_plan_is_faulted_in_without_changing_memory_and_must_lie_inside_it() {
        let memory =
            memory::create_guest_memory(&crate::config::MemoryConfig::new(8 << 20)).unwrap();
        memory
            .write_slice(b"already here", GuestAddress(0x10_0000))
            .unwrap();
        let ranges = vec![(0x10_0000, 3 << 20), (0x60_0000, 0x1000)];
        let prefault = Prefault::start(&memory, ranges).unwrap();
        // Until stopped it goes on; once it has gone through the plan it has done it all.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !prefault.thread.as_ref().unwrap().is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(prefault.stop(), (3 << 20) + 0x1000);
        let mut back = [0u8; 12];
        memory
            .read_slice(&mut back, GuestAddress(0x10_0000))
            .unwrap();
        assert_eq!(&back, b"already here");

        for bad in [(7 << 20, 2 << 20), (u64::MAX - 10, 20), (0, u64::MAX)] {
            let err = Prefault::start(&memory, vec![(0, 4096), bad])
                .err()
                .expect("a range outside the guest's memory");
            assert!(
                err.to_string().contains("outside the guest's memory"),
                "{err}"
            );
        }
    }

    #[test]
    fn memory_arrives_straight_in_and_damage_is_refused() {
        let memory =
            memory::create_guest_memory(&crate::config::MemoryConfig::new(8 << 20)).unwrap();
        memory
            .write_slice(&[9u8; 4096], GuestAddress(0x4000))
            .unwrap();
        let mut page = vec![0u8; 3 * 4096];
        page[..5].copy_from_slice(b"first");
        page[2 * 4096 + 7] = 7;
        let mut frame = MemoryFrame::default();
        frame
            .add_memory(0x1000, page.len(), false, |buf: &mut [u8]| {
                buf.copy_from_slice(&page);
                Ok::<(), ()>(())
            })
            .unwrap();
        let bytes = framed(&frame);
        load(&bytes, &memory).unwrap();
        let mut back = vec![0u8; 4 * 4096];
        memory.read_slice(&mut back, GuestAddress(0x1000)).unwrap();
        assert_eq!(&back[..5], b"first");
        assert_eq!(back[2 * 4096 + 7], 7);
        // The zero page in the middle was sent as zeros and written as zeros.
        assert!(back[4096..2 * 4096].iter().all(|&b| b == 0));
        assert_eq!(back[3 * 4096], 9, "nothing past the frame's ranges");

        // One flipped byte of data: refused by the checksum.
        let mut bad = bytes.clone();
        let at = bad.len() - 1;
        bad[at] ^= 1;
        let err = load(&bad, &memory).unwrap_err();
        assert!(err.to_string().contains("bad checksum"), "{err}");
        // Cut short: the connection's end.
        let err = load(&bytes[..bytes.len() - 100], &memory).unwrap_err();
        assert!(matches!(err, MigrationError::Connection(_)), "{err}");
        // A range past the guest's memory: refused, nothing read outside it.
        let mut frame = MemoryFrame::default();
        frame
            .add_memory(8 << 20, 4096, false, |buf: &mut [u8]| {
                buf.fill(1);
                Ok::<(), ()>(())
            })
            .unwrap();
        let err = load(&framed(&frame), &memory).unwrap_err();
        assert!(
            err.to_string().contains("outside the guest's memory"),
            "{err}"
        );
    }
}
