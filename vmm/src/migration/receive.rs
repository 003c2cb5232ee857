//! The destination side of a live migration (see the module docs of [`super`]).

use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress};

use super::protocol::{self, Complete, Hello, Kind, Range};
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
) -> Result<Received, MigrationError> {
    let mut stream = listener.accept(super::ACCEPT_TIMEOUT)?;
    let result = receive_on(&mut stream, kvm, template, retaps);
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
        memory::create_guest_memory(config.memory.size)
    }
    .map_err(|e| MigrationError::Vm(e.to_string()))?;
    let console = Console::new(&config.serial).map_err(|e| failed("the console")(e.into()))?;
    let backends = Backends::open(&mut config).map_err(failed("open the VM's disks and taps"))?;
    let vm = builder::build_on(kvm, template, &config, &console, &backends, memory)
        .map_err(failed("build the VM"))?;
    protocol::write_frame(stream, Kind::Ack, &[])?;

    let mut buffer = Vec::new();
    // Where the time goes while memory arrives: waiting for (and checking) frames, or
    // writing them into guest memory.
    let (mut receiving, mut loading) = (Duration::ZERO, Duration::ZERO);
    let state = loop {
        let at = Instant::now();
        let frame = protocol::read_frame_into(stream, buffer)?;
        receiving += at.elapsed();
        match frame.kind {
            Kind::Memory if hello.local => {
                return Err(MigrationError::Protocol(
                    "memory sent although it was handed over (local)".into(),
                ))
            }
            Kind::Memory => {
                let at = Instant::now();
                load(vm.memory(), &frame.payload)?;
                loading += at.elapsed();
                buffer = frame.payload;
            }
            Kind::State => break frame.json::<MachineState>()?,
            other => {
                return Err(MigrationError::Protocol(format!(
                    "expected memory or the machine state, got a {other:?} frame"
                )))
            }
        }
    };

    tracing::info!(
        "migration memory: {} ms receiving, {} ms writing into guest memory",
        receiving.as_millis(),
        loading.as_millis()
    );
    // The source is paused and its disks are flushed: read their metadata as it is now.
    vm.reload_backends()
        .map_err(failed("read the disks again at the switch-over"))?;
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

/// Writes a memory frame's ranges into `memory`; a range outside it is refused.
fn load(memory: &GuestMemoryMmap, payload: &[u8]) -> Result<(), MigrationError> {
    const ZEROS: [u8; 4096] = [0; 4096];
    let outside = |gpa: u64, len: usize| {
        MigrationError::Protocol(format!(
            "memory range {gpa:#x}+{len:#x} lies outside the guest's memory"
        ))
    };
    for range in protocol::parse_memory(payload)? {
        match range {
            Range::Data { gpa, data } => memory
                .write_slice(data, GuestAddress(gpa))
                .map_err(|_| outside(gpa, data.len()))?,
            Range::Zeros { gpa, len } => {
                let mut at = 0usize;
                while at < len as usize {
                    let n = (len as usize - at).min(ZEROS.len());
                    let addr = gpa
                        .checked_add(at as u64)
                        .ok_or_else(|| outside(gpa, len as usize))?;
                    memory
                        .write_slice(&ZEROS[..n], GuestAddress(addr))
                        .map_err(|_| outside(gpa, len as usize))?;
                    at += n;
                }
            }
        }
    }
    Ok(())
}
