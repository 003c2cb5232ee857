//! KVM-level tests with tiny hand-written guests. They boot through the real path (ELF loader,
//! PVH entry, vCPU setup, port I/O bus, legacy devices) and run on any `/dev/kvm`, PVM included,
//! because they execute only a few dozen instructions. (Saving, restoring, snapshots and live
//! migration: tiny_guest_state.rs.)

mod tiny;

use tiny::*;

#[test]
fn serial_output_and_acpi_poweroff() {
    let g = TinyGuest::new("hello");
    let (exit, out) = g.run(Asm::default().print("hello\n").poweroff(), 1);
    assert_eq!(exit.unwrap(), VmExit::Shutdown);
    assert_eq!(out, b"hello\n");
}

#[test]
fn i8042_reset_asks_for_a_reboot() {
    let g = TinyGuest::new("reset");
    let code = Asm::default()
        .print("r")
        .out_port(0x64, 0xfe)
        .halt_forever();
    let (exit, out) = g.run(code, 1);
    assert_eq!(exit.unwrap(), VmExit::Reset);
    assert_eq!(out, b"r");
}

#[test]
fn acpi_reset_register_asks_for_a_reboot() {
    let g = TinyGuest::new("acpireset");
    let (exit, _) = g.run(Asm::default().out_port(0x602, 1).halt_forever(), 1);
    assert_eq!(exit.unwrap(), VmExit::Reset);
}

#[test]
fn cmos_rtc_reports_a_valid_clock_and_the_current_year() {
    let g = TinyGuest::new("cmos");
    let code = Asm::default()
        .out_port(0x70, 0x0d) // status D: valid RAM and time
        .in_port(0x71)
        .print_al()
        .out_port(0x70, 0x32) // century (BCD)
        .in_port(0x71)
        .print_al()
        .out_port(0x70, 0x09) // year (BCD)
        .in_port(0x71)
        .print_al()
        .poweroff();
    let (exit, out) = g.run(code, 1);
    assert_eq!(exit.unwrap(), VmExit::Shutdown);
    assert_eq!(out.len(), 3, "{out:?}");
    assert_eq!(out[0], 0x80);
    let bcd = |b: u8| u32::from(b >> 4) * 10 + u32::from(b & 0xf);
    let year = bcd(out[1]) * 100 + bcd(out[2]);
    let now_year = 1970
        + (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            / 31_556_952) as u32;
    assert!(
        year.abs_diff(now_year) <= 1,
        "guest year {year}, host ~{now_year}"
    );
}

#[test]
fn unclaimed_port_and_mmio_reads_return_ones_without_stalling() {
    let g = TinyGuest::new("unclaimed");
    let code = Asm::default()
        .in_port(0x80)
        .print_al()
        .load_eax(0xd000_0000) // in the MMIO hole, no device there
        .print_al()
        .shr_eax(24)
        .print_al()
        .poweroff();
    let (exit, out) = g.run(code, 1);
    assert_eq!(exit.unwrap(), VmExit::Shutdown);
    assert_eq!(out, [0xff, 0xff, 0xff]);
}

#[test]
fn pvh_start_info_is_handed_to_the_guest() {
    let g = TinyGuest::new("pvhinfo");
    // EBX points at hvm_start_info: print its magic's low byte and its memmap entry count.
    let code = Asm::default()
        .load_eax_ebx(0)
        .print_al()
        .load_eax_ebx(0x30) // memmap_entries
        .print_al()
        .poweroff();
    let (exit, out) = g.run(code, 1);
    assert_eq!(exit.unwrap(), VmExit::Shutdown);
    // Low RAM, the BIOS area, RAM from 1 MiB, the PCI ECAM window.
    assert_eq!(out, [0x78, 4]);
}

#[test]
fn secondary_vcpus_wait_while_the_boot_vcpu_runs() {
    let g = TinyGuest::new("smp");
    let (exit, out) = g.run(Asm::default().print("bsp").poweroff(), 4);
    assert_eq!(exit.unwrap(), VmExit::Shutdown);
    assert_eq!(out, b"bsp");
}

#[test]
fn topology_and_machine_tables_reach_the_guest() {
    let g = TinyGuest::new("topology");
    // 1 thread × 3 cores × 1 die × 2 packages: APIC IDs 0, 1, 2, 4, 5, 6 (KVM takes vCPU IDs
    // with a gap). The boot vCPU prints leaf 0xB's package shift and core-level count, leaf
    // 1's addressable IDs per package, and the first byte of the SMBIOS entry point.
    let code = Asm::default()
        .cpuid(0xb, 1)
        .print_al()
        .mov_eax_ebx()
        .print_al()
        .cpuid(1, 0)
        .mov_eax_ebx()
        .shr_eax(16)
        .print_al()
        .load_eax(0xf0000)
        .print_al()
        .poweroff();
    let (exit, out) = g.run_with(code, 6, |c| {
        c.cpus.topology = Some(vmm::config::CpuTopology {
            threads_per_core: 1,
            cores_per_die: 3,
            dies_per_package: 1,
            packages: 2,
        })
    });
    assert_eq!(exit.unwrap(), VmExit::Shutdown);
    assert_eq!(out, [2, 3, 4, b'_']);
}

#[test]
fn triple_fault_resets() {
    let g = TinyGuest::new("triple");
    // Load an empty IDT and raise an exception: #UD -> #DF -> triple fault.
    let mut code = Asm::default().print("t");
    code.0.extend([0x0f, 0x0b]); // ud2 with the boot IDT limit covering no vector
    let (exit, out) = g.run(code, 1);
    assert_eq!(exit.unwrap(), VmExit::Reset);
    assert_eq!(out, b"t");
}

#[test]
fn pci_config_space_through_ports_and_ecam() {
    let g = TinyGuest::new("pci");
    let code = Asm::default()
        // 0xcf8 <- enable | bus 0, device 0, function 0, register 0; read the vendor ID.
        .mov_dx(0xcf8)
        .mov_eax(0x8000_0000)
        .out_dx_eax()
        .in_port(0xcfc)
        .print_al()
        // ECAM: device 1 (the virtio-rng) vendor and device IDs.
        .load_eax(0xe000_8000)
        .print_al()
        .shr_eax(16)
        .print_al()
        // Device 2 is absent: all ones.
        .load_eax(0xe001_0000)
        .print_al()
        .poweroff();
    let (exit, out) = g.run_with(code, 1, |c| c.rng = Some(RngConfig::default()));
    assert_eq!(exit.unwrap(), VmExit::Shutdown);
    // Intel host bridge (0x8086); Red Hat virtio vendor 0x1af4, modern virtio-rng 0x1044.
    assert_eq!(out, [0x86, 0xf4, 0x44, 0xff]);
}

#[test]
fn pause_parks_every_vcpu_and_resume_continues() {
    let g = TinyGuest::new("pause");
    // Print 'x' forever.
    let code = Asm::print_forever('x');
    let kernel = g.kernel(&code);
    let serial = g.dir.join("serial.out");
    let config = config(&kernel, &serial, 2);
    // Console and backends stay alive as long as the VM, as before.
    let Booted {
        console: _console,
        backends: _backends,
        running,
        ..
    } = boot(&config);
    let size = || std::fs::metadata(&serial).map(|m| m.len()).unwrap_or(0);
    let grows = || {
        let before = size();
        std::thread::sleep(std::time::Duration::from_millis(200));
        size() > before
    };
    assert!(grows(), "the guest prints");
    running.pause().unwrap();
    assert!(running.is_paused());
    // Output already in flight lands right after the pause; then nothing.
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert!(!grows(), "a paused guest does not run");
    running.pause().unwrap(); // pausing twice is harmless
    running.resume().unwrap();
    assert!(!running.is_paused());
    assert!(grows(), "the guest runs again after resume");
    running.request_shutdown();
    let exit = running.wait(Some(std::time::Duration::from_secs(10)));
    assert_eq!(exit.unwrap().unwrap(), VmExit::Shutdown);
    running.stop();
}

#[test]
fn controller_follows_the_lifecycle_rules() {
    use vmm::controller::{ControlError, Reply, Request};
    use vmm::lifecycle::VmState;
    let g = TinyGuest::new("controller");
    // Print 'x' forever (the VMM ends it).
    let code = Asm::print_forever('x');
    let kernel = g.kernel(&code);
    let (ctl, thread, events_path) = g.controller_with_events();
    let state = |ctl: &Controller| match ctl.handle(Request::Info) {
        Ok(Reply::Info { state, .. }) => Some(state),
        _ => None,
    };
    let conflict = |r: Result<Reply, ControlError>| matches!(r, Err(ControlError::WrongState(_)));
    let no_vm = |r: Result<Reply, ControlError>| matches!(r, Err(ControlError::NoVm(_)));

    assert!(no_vm(ctl.handle(Request::Info)), "no VM yet");
    assert!(no_vm(ctl.handle(Request::Boot)));
    assert_eq!(
        ctl.handle(Request::Delete),
        Ok(Reply::Done),
        "deleting nothing is fine"
    );
    let mut bad = config(&kernel, &g.dir.join("serial.out"), 0);
    bad.cpus.boot_vcpus = 0;
    assert!(matches!(
        ctl.handle(Request::Create(Box::new(bad))),
        Err(ControlError::Invalid(_))
    ));
    let cfg = config(&kernel, &g.dir.join("serial.out"), 2);
    assert_eq!(
        ctl.handle(Request::Create(Box::new(cfg.clone()))),
        Ok(Reply::Done)
    );
    assert!(
        conflict(ctl.handle(Request::Create(Box::new(cfg)))),
        "only one VM"
    );
    assert_eq!(state(&ctl), Some(VmState::Created));
    assert!(conflict(ctl.handle(Request::Pause)), "not running");
    assert_eq!(ctl.handle(Request::Boot), Ok(Reply::Done));
    assert_eq!(state(&ctl), Some(VmState::Running));
    assert!(conflict(ctl.handle(Request::Boot)), "already running");
    assert!(conflict(ctl.handle(Request::Resume)), "not paused");
    assert_eq!(ctl.handle(Request::Pause), Ok(Reply::Done));
    assert_eq!(state(&ctl), Some(VmState::Paused));
    assert!(conflict(ctl.handle(Request::Pause)), "already paused");
    assert!(conflict(ctl.handle(Request::Reboot)), "paused");
    assert_eq!(ctl.handle(Request::Resume), Ok(Reply::Done));
    assert_eq!(ctl.handle(Request::Reboot), Ok(Reply::Done));
    assert_eq!(state(&ctl), Some(VmState::Running));
    assert!(matches!(
        ctl.handle(Request::Counters),
        Ok(Reply::Counters(_))
    ));
    assert_eq!(ctl.handle(Request::Shutdown), Ok(Reply::Done));
    assert_eq!(state(&ctl), Some(VmState::Shutdown));
    assert!(conflict(ctl.handle(Request::PowerButton)), "not running");
    assert_eq!(ctl.handle(Request::Boot), Ok(Reply::Done), "boots again");
    assert_eq!(ctl.handle(Request::Delete), Ok(Reply::Done));
    assert!(no_vm(ctl.handle(Request::Info)), "deleted");
    assert_eq!(ctl.handle(Request::ShutdownVmm), Ok(Reply::Done));
    let ended = thread.join().unwrap().unwrap();
    assert!(!ended.guest_shutdown);
    assert!(ctl.handle(Request::Info).is_err(), "the VMM is gone");

    let events: Vec<String> = std::fs::read_to_string(&events_path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["event"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(
        events,
        [
            "created",
            "booting",
            "booted",
            "pausing",
            "paused",
            "resuming",
            "resumed",
            "rebooting",
            "rebooted",
            "shutdown",
            "booting",
            "booted",
            "deleted",
            "shutdown"
        ]
    );
}

#[test]
fn controller_sees_the_guest_power_off() {
    use vmm::controller::{Reply, Request};
    use vmm::lifecycle::VmState;
    let g = TinyGuest::new("controller-poweroff");
    let kernel = g.kernel(&Asm::default().print("bye").poweroff());
    let options = tiny_options();
    let cfg = config(&kernel, &g.dir.join("serial.out"), 1);
    // serve: the VM stays, Shutdown.
    let (ctl, _thread) = Controller::start(options.clone(), Default::default(), false).unwrap();
    ctl.handle(Request::Create(Box::new(cfg.clone()))).unwrap();
    // Twice: the second VM's exit fd may reuse the first one's number.
    for boot in 1..=2 {
        ctl.handle(Request::Boot).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Ok(Reply::Info {
                state: VmState::Shutdown,
                ..
            }) = ctl.handle(Request::Info)
            {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the guest's power-off was not seen (boot {boot})"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    // run: the controller ends with the guest.
    let (ctl, thread) = Controller::start(options, Default::default(), true).unwrap();
    ctl.handle(Request::Create(Box::new(cfg))).unwrap();
    ctl.handle(Request::Boot).unwrap();
    let ended = thread.join().unwrap().unwrap();
    assert!(ended.guest_shutdown);
}

#[test]
fn controller_follows_a_guest_that_keeps_rebooting() {
    use vmm::controller::{Reply, Request};
    let g = TinyGuest::new("controller-reboots");
    // Reset through the i8042 at once, every boot.
    let code = Asm::default()
        .print("r")
        .out_port(0x64, 0xfe)
        .halt_forever();
    let kernel = g.kernel(&code);
    let (ctl, thread, events_path) = g.controller_with_events();
    let cfg = config(&kernel, &g.dir.join("serial.out"), 1);
    ctl.handle(Request::Create(Box::new(cfg))).unwrap();
    ctl.handle(Request::Boot).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(ctl.handle(Request::ShutdownVmm), Ok(Reply::Done));
    thread.join().unwrap().unwrap();
    // Each new VM's exit events are watched (its fd may reuse the last one's number).
    let reboots = std::fs::read_to_string(&events_path)
        .unwrap()
        .matches("\"rebooted\"")
        .count();
    assert!(reboots >= 3, "only {reboots} reboots seen in 500 ms");
}

/// Serial mode Socket: a client attached before the boot sees everything the guest prints, and
/// the socket file goes when the VM is deleted.
#[test]
fn the_serial_console_on_a_socket() {
    use std::io::Read;
    use vmm::controller::Request;
    let g = TinyGuest::new("serial-socket");
    let (mut cfg, _) = counting_config(&g);
    let socket = g.dir.join("serial.sock");
    cfg.serial = vmm::config::ConsoleConfig::Socket(socket.clone());
    let (ctl, thread, _) = g.controller_with_events();
    ctl.handle(Request::Create(Box::new(cfg))).unwrap();
    let mut client = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    client
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    ctl.handle(Request::Boot).unwrap();
    let expected = counting_guest_output();
    let mut got = vec![0u8; expected.len()];
    client.read_exact(&mut got).unwrap();
    assert_eq!(got, expected);
    ctl.handle(Request::Delete).unwrap();
    assert!(!socket.exists(), "the socket goes with the VM");
    ctl.handle(Request::ShutdownVmm).unwrap();
    thread.join().unwrap().unwrap();
}

/// A disk image with an MBR and one ext4 partition holding `files` ((path in the file
/// system, host file)), made with `mkfs.ext4 -d` (e2fsprogs).
fn disk_with(g: &TinyGuest, files: &[(&str, &std::path::Path)]) -> std::path::PathBuf {
    let root = g.dir.join("fs");
    for (path, from) in files {
        let to = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(from, to).unwrap();
    }
    let fs = g.dir.join("fs.ext4");
    let made = std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&fs)
        .arg("8M")
        .status()
        .expect("mkfs.ext4 (e2fsprogs; scripts/test-all.sh installs it)");
    assert!(made.success());
    let fs = std::fs::read(fs).unwrap();
    let mut disk = vec![0u8; 1 << 20];
    disk[446 + 4] = 0x83;
    disk[446 + 8..446 + 12].copy_from_slice(&2048u32.to_le_bytes());
    disk[446 + 12..446 + 16].copy_from_slice(&((fs.len() / 512) as u32).to_le_bytes());
    disk[510..512].copy_from_slice(&[0x55, 0xaa]);
    disk.extend(fs);
    let path = g.dir.join("disk.raw");
    std::fs::write(&path, disk).unwrap();
    path
}

#[test]
fn a_disk_boots_the_kernel_and_command_line_its_grub_cfg_names() {
    // The guest prints its command line (hvm_start_info's cmdline_paddr) and powers off.
    let mut code = Asm::default().load_eax_ebx(24);
    code.0.extend([0x89, 0xc6]); // mov esi, eax
    code.0.extend([0x8a, 0x06, 0x84, 0xc0, 0x74, 0x08]); // next: mov al, [esi]; test al, al; jz done
    code = code.print_al();
    code.0.extend([0x46, 0xeb, 0xf2]); // inc esi; jmp next
    let code = code.poweroff(); // done:
    let g = TinyGuest::new("diskboot");
    let kernel = g.kernel(&code);
    let grub = g.dir.join("grub.cfg");
    std::fs::write(
        &grub,
        "menuentry 'tiny' {\n\tlinux /boot/tiny.elf quiet root=/dev/vda1\n}\n",
    )
    .unwrap();
    let disk = disk_with(
        &g,
        &[("/boot/tiny.elf", &kernel), ("/boot/grub/grub.cfg", &grub)],
    );
    let (exit, out) = g.run_with(Asm(code.0.clone()), 1, |c| {
        c.payload.kernel = None;
        c.payload.cmdline = "extra=1".into();
        c.disks =
            vec![vmm::config::DiskConfig::parse(&format!("path={}", disk.display())).unwrap()];
    });
    assert_eq!(exit.unwrap(), VmExit::Shutdown);
    assert_eq!(
        String::from_utf8_lossy(&out),
        "quiet root=/dev/vda1 console=ttyS0 extra=1",
        "the entry's command line, a serial console, then the configuration's"
    );

    // A disk with no partition table is refused with its reason; nothing runs.
    let blank = g.dir.join("blank.raw");
    std::fs::write(&blank, vec![0u8; 1 << 20]).unwrap();
    let config = {
        let mut c = config(&kernel, &g.dir.join("serial.out"), 1);
        c.payload.kernel = None;
        c.disks =
            vec![vmm::config::DiskConfig::parse(&format!("path={}", blank.display())).unwrap()];
        c
    };
    let kvm = vmm::vstate::kvm::open_any().expect("/dev/kvm");
    let template = CpuTemplate::from_kvm(&kvm).unwrap();
    let console = Console::new(&config.serial).unwrap();
    let backends = vmm::backends::Backends::open(&mut config.clone()).unwrap();
    let e = match Vm::new(&kvm, &template, &config, &console, &backends) {
        Ok(_) => panic!("a blank disk booted"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("blank.raw") && e.contains("no partition table"),
        "{e}"
    );
}
