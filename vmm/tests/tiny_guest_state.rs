//! Tiny-guest tests of a machine's state leaving it: save and restore into a fresh machine,
//! snapshots on disk (and damaged ones refused), live migration (and broken destinations),
//! throttling. They run on any `/dev/kvm`, PVM included (see tiny_guest.rs).

mod tiny;

use std::path::{Path, PathBuf};

use tiny::*;

#[test]
fn a_paused_machine_saved_and_restored_into_a_fresh_one_finishes_its_work() {
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    let g = TinyGuest::new("restore");
    let (config, serial) = counting_config(&g);
    let Booted {
        kvm,
        template,
        console,
        backends: _backends,
        running,
    } = boot(&config);
    let printed = |path: &Path| std::fs::read(path).unwrap_or_default();
    wait_printed(&serial, 100);
    assert!(running.save().is_err(), "a running VM is not saved");
    running.pause().unwrap();
    let state = running.save().unwrap();
    assert_eq!(state.vcpus.len(), 2);
    assert_eq!(state.devices.pci.functions.len(), 1);

    // A fresh machine from the same configuration, COM1 now writing elsewhere.
    let serial2 = g.dir.join("serial2.out");
    let mut config2 = config.clone();
    config2.serial = vmm::config::ConsoleConfig::File(serial2.clone());
    let console2 = Console::new(&config2.serial).unwrap();
    let backends2 = vmm::backends::Backends::open(&mut config2.clone()).unwrap();
    let fresh = vmm::builder::build(&kvm, &template, &config2, &console2, &backends2).unwrap();
    for region in running.memory().iter() {
        let mut bytes = vec![0u8; region.len() as usize];
        running
            .memory()
            .read_slice(&mut bytes, region.start_addr())
            .unwrap();
        fresh
            .memory()
            .write_slice(&bytes, region.start_addr())
            .unwrap();
    }
    let before = printed(&serial);
    running.stop();
    assert!(before.len() < 600, "saved before the guest finished");
    fresh.restore(&state).unwrap();
    let exit = fresh.run().unwrap();
    assert_eq!(exit, VmExit::Shutdown);
    drop((console, console2));

    let mut whole = before;
    whole.extend(printed(&serial2));
    let expected = counting_guest_output();
    assert_eq!(
        String::from_utf8_lossy(&whole),
        String::from_utf8_lossy(&expected),
        "the output of both machines is the guest's whole output, once"
    );
}

#[test]
fn a_restore_refuses_a_machine_of_another_shape() {
    let g = TinyGuest::new("restore-shape");
    let kernel = g.kernel(&Asm::default().print("x").halt_forever());
    let serial = g.dir.join("serial.out");
    let config = config(&kernel, &serial, 1);
    let Booted {
        kvm,
        template,
        console,
        backends,
        running,
    } = boot(&config);
    running.pause().unwrap();
    let state = running.save().unwrap();
    running.stop();
    // Two vCPUs where one was saved; an rng device where there was none.
    let two = vmm::builder::build(
        &kvm,
        &template,
        &vmm::VmConfig {
            cpus: CpusConfig::new(2),
            ..config.clone()
        },
        &console,
        &backends,
    )
    .unwrap();
    let err = two.restore(&state).unwrap_err().to_string();
    assert_eq!(err, "cannot restore the VM: 1 vCPUs saved, this VM has 2");
    drop(two); // its COM1 interrupt is the console's, which the next VM takes
    let rng_config = vmm::VmConfig {
        rng: Some(RngConfig {
            src: "/dev/urandom".into(),
        }),
        ..config.clone()
    };
    let with_rng = vmm::builder::build(
        &kvm,
        &template,
        &rng_config,
        &console,
        &vmm::backends::Backends::open(&mut rng_config.clone()).unwrap(),
    )
    .unwrap();
    let err = with_rng.restore(&state).unwrap_err().to_string();
    assert!(
        err.starts_with("PCI: the saved machine has devices []"),
        "{err}"
    );
}

#[test]
fn a_snapshot_on_disk_is_restored_by_another_vmm_and_refused_when_damaged() {
    use std::os::unix::fs::MetadataExt;
    use vmm::controller::{ControlError, Request};
    use vmm::lifecycle::VmState;

    let g = TinyGuest::new("snapshot");
    let (cfg, serial) = counting_config(&g);
    let snap = g.dir.join("snap");
    {
        let (ctl, thread, _) = g.controller_with_events();
        ctl.handle(Request::Create(Box::new(cfg.clone()))).unwrap();
        ctl.handle(Request::Boot).unwrap();
        wait_printed(&serial, 100);
        assert!(matches!(
            ctl.handle(Request::Snapshot(snap.clone())),
            Err(ControlError::WrongState(_))
        ));
        ctl.handle(Request::Pause).unwrap();
        ctl.handle(Request::Snapshot(snap.clone())).unwrap();
        assert_eq!(state(&ctl), Some(VmState::Paused), "still paused");
        match ctl.handle(Request::Snapshot(snap.clone())) {
            Err(ControlError::Invalid(m)) => assert!(m.contains("not empty"), "{m}"),
            other => panic!("snapshot into a full directory: {other:?}"),
        }
        ctl.handle(Request::ShutdownVmm).unwrap();
        thread.join().unwrap().unwrap();
    }
    let printed_before = std::fs::read(&serial).unwrap().len();
    assert!(printed_before < 600, "saved before the guest finished");
    let memory = std::fs::metadata(snap.join("memory.bin")).unwrap();
    assert_eq!(memory.len(), 64 << 20);
    assert!(
        memory.blocks() * 512 < 4 << 20,
        "zero pages are holes: {} bytes allocated",
        memory.blocks() * 512
    );

    // Damaged copies are refused, naming the section, and leave no VM.
    let damaged = |name: &str, damage: &dyn Fn(&Path)| {
        let copy = g.dir.join(name);
        std::fs::create_dir_all(&copy).unwrap();
        for f in ["snapshot.json", "config.json", "machine.json", "memory.bin"] {
            std::fs::copy(snap.join(f), copy.join(f)).unwrap();
        }
        damage(&copy);
        let (ctl, thread, _) = g.controller_with_events();
        let err = match ctl.handle(Request::Restore(copy, vec![])) {
            Err(ControlError::Invalid(m)) => m,
            other => panic!("{name}: restored anyway: {other:?}"),
        };
        assert_eq!(state(&ctl), None, "{name}: no VM after a refused restore");
        ctl.handle(Request::ShutdownVmm).unwrap();
        thread.join().unwrap().unwrap();
        err
    };
    let flip = |path: &Path, at: u64| {
        let mut bytes = std::fs::read(path).unwrap();
        bytes[at as usize] ^= 0x20;
        std::fs::write(path, bytes).unwrap();
    };
    let err = damaged("corrupt-machine", &|d| flip(&d.join("machine.json"), 100));
    assert!(err.contains("machine.json: checksum mismatch"), "{err}");
    let err = damaged("truncated-memory", &|d| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join("memory.bin"))
            .unwrap();
        f.set_len(32 << 20).unwrap();
    });
    assert!(
        err.contains("memory.bin: 33554432 bytes, the manifest says 67108864"),
        "{err}"
    );
    // The guest's code is at 1 MiB: one flipped byte there.
    let err = damaged("corrupt-memory", &|d| {
        flip(&d.join("memory.bin"), 0x10_0010)
    });
    assert!(
        err.contains("memory.bin: chunk at 0x0: checksum mismatch"),
        "{err}"
    );
    let err = damaged("future", &|d| {
        let path = d.join("snapshot.json");
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.replace("\"version\": 1", "\"version\": 2")).unwrap();
    });
    assert!(
        err.contains("format version 2, this podvisor reads version 1"),
        "{err}"
    );
    let err = damaged("no-manifest", &|d| {
        std::fs::remove_file(d.join("snapshot.json")).unwrap()
    });
    assert!(err.contains("snapshot.json: cannot read it"), "{err}");

    // Another VMM brings it back paused; resumed, the guest finishes its count.
    let (ctl, thread, events) = g.controller_with_events();
    let retap = vec![vmm::config::NetRetap {
        id: "_net0".into(),
        tap: "pv-none".into(),
    }];
    match ctl.handle(Request::Restore(snap.clone(), retap)) {
        Err(ControlError::Invalid(e)) => assert!(
            e.contains("no network interface '_net0' (it has: none)"),
            "{e}"
        ),
        other => panic!("a tap for an interface the VM has not: {other:?}"),
    }
    assert_eq!(state(&ctl), None, "a refused restore leaves no VM");
    ctl.handle(Request::Restore(snap.clone(), vec![])).unwrap();
    assert_eq!(state(&ctl), Some(VmState::Paused));
    assert!(
        matches!(
            ctl.handle(Request::Restore(snap.clone(), vec![])),
            Err(ControlError::WrongState(_))
        ),
        "one VM"
    );
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert_eq!(
        std::fs::read(&serial).unwrap().len(),
        printed_before,
        "a restored VM stays paused"
    );
    ctl.handle(Request::Resume).unwrap();
    wait_until_shut_down(&ctl, 20, || {
        format!(
            "the restored guest does not finish ({} bytes printed)",
            std::fs::read(&serial).unwrap().len()
        )
    });
    ctl.handle(Request::ShutdownVmm).unwrap();
    thread.join().unwrap().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&std::fs::read(&serial).unwrap()),
        String::from_utf8_lossy(&counting_guest_output()),
        "the guest's whole output, once"
    );
    let events = std::fs::read_to_string(events).unwrap();
    assert!(
        events.contains("\"restoring\"") && events.contains("\"restored\""),
        "{events}"
    );
}

/// A destination that breaks off at `cut`: 0 closes at once, 1 after HELLO, 2 at the first
/// memory frame, 3 answers the machine state with an error, 4 closes instead of confirming
/// that the guest runs (the source cannot know whether it does), 5 refuses to run it.
/// The state of the VM behind `ctl` (None: it has none).
fn state(ctl: &vmm::controller::Controller) -> Option<vmm::lifecycle::VmState> {
    match ctl.handle(vmm::controller::Request::Info) {
        Ok(vmm::controller::Reply::Info { state, .. }) => Some(state),
        _ => None,
    }
}

/// Waits until the guest behind `ctl` has shut down; after `secs`, fails with `why()`.
fn wait_until_shut_down(ctl: &vmm::controller::Controller, secs: u64, why: impl Fn() -> String) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while state(ctl) != Some(vmm::lifecycle::VmState::Shutdown) {
        assert!(
            std::time::Instant::now() < deadline,
            "{}: {:?}",
            why(),
            state(ctl)
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn broken_destination(socket: PathBuf, cut: u32) -> std::thread::JoinHandle<()> {
    use vmm::migration::protocol::{self, Kind};
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = std::fs::remove_file(&socket);
        if cut == 0 {
            return;
        }
        while let Ok(frame) = protocol::read_frame(&mut s) {
            match frame.kind {
                Kind::Hello if cut == 1 => return,
                Kind::Hello | Kind::Config => {
                    protocol::write_frame(&mut s, Kind::Ack, &[]).unwrap()
                }
                Kind::Memory if cut == 2 => return,
                Kind::State if cut == 3 => {
                    protocol::write_frame(&mut s, Kind::Error, b"injected failure").unwrap();
                    return;
                }
                Kind::State => protocol::write_frame(&mut s, Kind::Ack, &[]).unwrap(),
                Kind::Complete if cut == 5 => {
                    protocol::write_frame(&mut s, Kind::Error, b"injected: cannot resume").unwrap();
                    return;
                }
                Kind::Complete => return,
                _ => {}
            }
        }
    })
}

/// The last `migration-completed` event in the event file at `path`.
fn last_migration_completed(path: &std::path::Path) -> serde_json::Value {
    let events = std::fs::read_to_string(path).unwrap();
    let line = events
        .lines()
        .rfind(|l| l.contains("migration-completed"))
        .unwrap_or_else(|| panic!("no migration-completed event in {}", path.display()));
    serde_json::from_str(line).unwrap()
}

#[test]
fn live_migration_moves_a_busy_guest_and_a_failure_leaves_it_at_the_source() {
    use vmm::controller::{ControlError, Reply, Request};
    use vmm::lifecycle::VmState;
    use vmm::migration::{Endpoint, SendOptions};

    // ~8 s on PVM: the faults take ~2 s, the migration comes before the end.
    const COUNT: u32 = 2_500;
    let g = TinyGuest::new("migrate");
    let kernel = g.kernel(&counting_guest_of(COUNT));
    let serial = g.dir.join("serial.out");
    let mut cfg = config(&kernel, &serial, 2);
    cfg.rng = Some(RngConfig {
        src: "/dev/urandom".into(),
    });
    let printed = || std::fs::metadata(&serial).map_or(0, |m| m.len());
    let (source, source_thread, events) = g.controller_with_events();
    source
        .handle(Request::Create(Box::new(cfg.clone())))
        .unwrap();
    source.handle(Request::Boot).unwrap();
    wait_printed(&serial, 100);

    // Every broken destination: the migration fails with a reason, the guest runs on at the
    // source (it keeps printing; after cut 4 once resumed) and the next attempt is possible.
    let options = SendOptions {
        downtime_limit_ms: 50,
        ..SendOptions::default()
    };
    for cut in 0..6 {
        let socket = g.dir.join(format!("broken-{cut}.sock"));
        let fake = broken_destination(socket.clone(), cut);
        let err = match source.handle(Request::SendMigration(
            Endpoint::Unix(socket),
            options.clone(),
        )) {
            Err(ControlError::Failed(m)) => m,
            other => panic!("cut {cut}: migrated to a broken destination: {other:?}"),
        };
        fake.join().unwrap();
        if cut == 5 {
            assert!(err.contains("cannot resume"), "{err}");
        }
        if cut == 3 {
            assert!(err.contains("injected failure"), "{err}");
            // vm.info tells what happened, and how far it got.
            match source.handle(Request::Info) {
                Ok(Reply::Info {
                    migration: Some(m), ..
                }) => {
                    assert_eq!(m.state, vmm::migration::MigrationState::Failed);
                    assert!(m.error.unwrap().contains("injected failure"));
                    assert!(m.progress.round >= 1 && m.progress.bytes_sent > 0);
                }
                other => panic!("vm.info after a failed migration: {other:?}"),
            }
        }
        if cut == 4 {
            // Told to run the guest, the destination never confirmed: it may run it, so the
            // source keeps it paused until someone who knows resumes it.
            assert!(err.contains("stays paused"), "{err}");
            assert_eq!(state(&source), Some(VmState::Paused), "cut {cut}: {err}");
            let now = printed();
            std::thread::sleep(std::time::Duration::from_millis(300));
            assert_eq!(printed(), now, "a guest left paused went on printing");
            source.handle(Request::Resume).unwrap();
        }
        assert_eq!(state(&source), Some(VmState::Running), "cut {cut}: {err}");
        let now = printed();
        wait_printed(&serial, now + 20);
    }
    // vm.cancel-migration: refused with nothing under way; during a migration (here at the
    // switch-over, the guest paused: the destination never answers the machine state) the
    // guest runs on at once, long before the connection's 60 s timeout.
    match source.handle(Request::CancelMigration) {
        Err(ControlError::WrongState(m)) => assert!(m.contains("no migration"), "{m}"),
        other => panic!("a cancel with no migration: {other:?}"),
    }
    let socket = g.dir.join("stalled.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let (saw_state, state_seen) = std::sync::mpsc::channel();
    let fake = std::thread::spawn(move || {
        use vmm::migration::protocol::{self, Kind};
        let (mut s, _) = listener.accept().unwrap();
        while let Ok(frame) = protocol::read_frame(&mut s) {
            match frame.kind {
                Kind::Hello | Kind::Config => {
                    protocol::write_frame(&mut s, Kind::Ack, &[]).unwrap()
                }
                Kind::State => saw_state.send(()).unwrap(),
                _ => {}
            }
        }
    });
    let canceller = {
        let source = source.clone();
        std::thread::spawn(move || {
            state_seen
                .recv_timeout(std::time::Duration::from_secs(30))
                .expect("the machine state is sent");
            source.handle(Request::CancelMigration)
        })
    };
    let started = std::time::Instant::now();
    match source.handle(Request::SendMigration(
        Endpoint::Unix(socket),
        options.clone(),
    )) {
        Err(ControlError::Failed(m)) => assert!(m.contains("cancelled"), "{m}"),
        other => panic!("a cancelled migration: {other:?}"),
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(30));
    canceller.join().unwrap().unwrap();
    fake.join().unwrap();
    assert_eq!(state(&source), Some(VmState::Running));
    let now = printed();
    wait_printed(&serial, now + 20);

    match source.handle(Request::SendMigration(
        Endpoint::Unix(g.dir.join("nobody.sock")),
        options.clone(),
    )) {
        Err(ControlError::Invalid(m)) => assert!(m.contains("cannot connect"), "{m}"),
        other => panic!("nobody listening: {other:?}"),
    }

    let source_events = std::fs::read_to_string(&events).unwrap();
    for event in ["migration-started", "migration-failed"] {
        assert!(source_events.contains(event), "{event}: {source_events}");
    }

    // A second VMM on this host takes the guest with its memory handed over (local): only the
    // state is sent. Then a real destination takes it from there while it runs; it finishes
    // its count there, its memory (counted beside a register) consistent, its output whole
    // and once.
    let (middle, middle_thread, middle_events) = g.controller_with_events_in("middle-events");
    let local_socket = g.dir.join("local.sock");
    let receiving = {
        let middle = middle.clone();
        let endpoint = Endpoint::Unix(local_socket.clone());
        std::thread::spawn(move || middle.handle(Request::ReceiveMigration(endpoint, vec![])))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !local_socket.exists() {
        assert!(std::time::Instant::now() < deadline, "no local destination");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let local = SendOptions {
        local: true,
        ..options.clone()
    };
    source
        .handle(Request::SendMigration(Endpoint::Unix(local_socket), local))
        .unwrap();
    receiving.join().unwrap().unwrap();
    assert_eq!(
        state(&source),
        None,
        "the source has no VM after the migration"
    );
    assert_eq!(state(&middle), Some(VmState::Running));
    let handed = last_migration_completed(&g.dir.join("events"));
    assert_eq!(handed["properties"]["bytes_sent"], 0, "{handed}");

    let (dest, dest_thread, dest_events) = g.controller_with_events_in("dest-events");
    // Over TCP on the loopback (the broken destinations above were Unix sockets).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = Endpoint::Tcp(format!("127.0.0.1:{port}"));
    let receiving = {
        let dest = dest.clone();
        let endpoint = endpoint.clone();
        std::thread::spawn(move || dest.handle(Request::ReceiveMigration(endpoint, vec![])))
    };
    // Over a slow link, with more than one frame (4 MiB) of memory written: the first pass
    // waits between its frames, the guest writes pages meanwhile (each number's own page,
    // once), the pass leaves them to the next round, which must send them.
    wait_printed(&serial, 1_200);
    let before = printed();
    let slow = SendOptions {
        bandwidth_limit: Some(8 << 20),
        ..options.clone()
    };
    // Until the destination listens, the source cannot connect (and keeps its VM).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match middle.handle(Request::SendMigration(endpoint.clone(), slow.clone())) {
            Ok(_) => break,
            Err(ControlError::Invalid(m))
                if m.contains("cannot connect") && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => panic!("migration over TCP: {e}"),
        }
    }
    receiving.join().unwrap().unwrap();
    assert_eq!(
        state(&middle),
        None,
        "the source has no VM after the migration"
    );
    wait_until_shut_down(&dest, 60, || {
        format!(
            "the migrated guest does not finish ({} bytes printed)",
            printed()
        )
    });
    assert!(
        before < u64::from(COUNT),
        "migrated before the guest finished ({before} letters printed)"
    );
    for (ctl, thread) in [
        (source, source_thread),
        (middle, middle_thread),
        (dest, dest_thread),
    ] {
        ctl.handle(Request::ShutdownVmm).unwrap();
        thread.join().unwrap().unwrap();
    }
    let output = std::fs::read(&serial).unwrap();
    assert!(
        output == counting_guest_output_of(COUNT),
        "the guest's whole output, once, ending in ok: ...{}",
        String::from_utf8_lossy(&output[output.len().saturating_sub(40)..])
    );
    let events = std::fs::read_to_string(dest_events).unwrap();
    for event in ["migration-receiving", "migration-completed"] {
        assert!(events.contains(event), "{event}: {events}");
    }
    // The sender's last event has the migration's figures.
    let last = last_migration_completed(&middle_events);
    let figures = &last["properties"];
    assert!(
        figures["downtime_ms"].is_u64()
            && figures["total_ms"].is_u64()
            && figures["round"].as_u64() >= Some(2),
        "{last}"
    );
}

#[test]
fn a_throttled_guest_runs_slower_and_recovers() {
    use vm_memory::{Bytes, GuestAddress};
    let g = TinyGuest::new("throttle");
    // Prints once, then counts at 0x200000 as fast as it can, never leaving the guest.
    let mut spin = Asm::default().print("x");
    spin.0.extend([0xff, 0x05, 0x00, 0x00, 0x20, 0x00]); // inc dword [0x200000]
    spin.0.extend([0xeb, 0xf8]); // jmp back to the inc
    let kernel = g.kernel(&spin);
    let serial = g.dir.join("serial.out");
    let booted = boot(&config(&kernel, &serial, 1));
    let vm = &booted.running;
    wait_printed(&serial, 1);
    let count = || {
        vm.memory()
            .read_obj::<u32>(GuestAddress(0x20_0000))
            .unwrap()
    };
    let rate = || {
        let start = count();
        std::thread::sleep(std::time::Duration::from_millis(800));
        count().wrapping_sub(start)
    };
    let free = rate();
    vm.set_throttle(90).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let throttled = rate();
    vm.set_throttle(0).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let again = rate();
    // (Against the faster of the two free runs: on a busy machine either may be starved.)
    assert!(
        u64::from(throttled) * 3 < u64::from(free.max(again)),
        "increments per 0.8 s: {free} free, {throttled} at 90% throttle, {again} after"
    );
    booted.running.stop();
}
