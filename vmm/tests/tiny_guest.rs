//! KVM-level tests with tiny hand-written guests. They boot through the real path (ELF loader,
//! PVH entry, vCPU setup, port I/O bus, legacy devices) and run on any `/dev/kvm`, PVM included,
//! because they execute only a few dozen instructions.

use std::path::{Path, PathBuf};

use vmm::config::{ConsoleConfig, CpusConfig, MemoryConfig, PayloadConfig, RngConfig, VmConfig};
use vmm::controller::Controller;
use vmm::vstate::vcpu::CpuTemplate;
use vmm::{Console, Vm, VmExit};

/// Where the guest code is loaded and entered (32-bit protected mode, paging off).
const CODE_ADDR: u64 = 0x10_0000;

/// A minimal x86 assembler for 32-bit protected mode: just what the tests need.
#[derive(Default)]
struct Asm(Vec<u8>);

impl Asm {
    fn mov_dx(mut self, v: u16) -> Self {
        self.0.extend([0x66, 0xba]);
        self.0.extend(v.to_le_bytes());
        self
    }
    fn mov_al(mut self, v: u8) -> Self {
        self.0.extend([0xb0, v]);
        self
    }
    fn out_dx_al(mut self) -> Self {
        self.0.push(0xee);
        self
    }
    fn out_dx_eax(mut self) -> Self {
        self.0.push(0xef);
        self
    }
    /// `mov eax, imm32`
    fn mov_eax(mut self, v: u32) -> Self {
        self.0.push(0xb8);
        self.0.extend(v.to_le_bytes());
        self
    }
    fn in_al_dx(mut self) -> Self {
        self.0.push(0xec);
        self
    }
    /// `mov eax, [addr]`
    fn load_eax(mut self, addr: u32) -> Self {
        self.0.push(0xa1);
        self.0.extend(addr.to_le_bytes());
        self
    }
    /// `mov eax, [ebx + disp8]`
    fn load_eax_ebx(mut self, disp: u8) -> Self {
        self.0.extend([0x8b, 0x43, disp]);
        self
    }
    /// `shr eax, n`
    fn shr_eax(mut self, n: u8) -> Self {
        self.0.extend([0xc1, 0xe8, n]);
        self
    }
    fn out_port(self, port: u16, value: u8) -> Self {
        self.mov_dx(port).mov_al(value).out_dx_al()
    }
    fn in_port(self, port: u16) -> Self {
        self.mov_dx(port).in_al_dx()
    }
    /// Writes AL to COM1.
    fn print_al(self) -> Self {
        self.mov_dx(0x3f8).out_dx_al()
    }
    fn print(mut self, s: &str) -> Self {
        for b in s.bytes() {
            self = self.out_port(0x3f8, b);
        }
        self
    }
    /// Powers off through the ACPI sleep control register (SLP_TYP=5, SLP_EN).
    fn poweroff(self) -> Self {
        self.out_port(0x600, 0x34).halt_forever()
    }
    fn halt_forever(mut self) -> Self {
        self.0.extend([0xf4, 0xeb, 0xfd]);
        self
    }
}

/// Wraps `code` in an ELF64 image with one PT_LOAD at [`CODE_ADDR`] and a Xen PVH entry note.
fn pvh_elf(code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let note_off = EHDR + 2 * PHDR;
    let mut note = Vec::new();
    note.extend(4u32.to_le_bytes()); // namesz
    note.extend(4u32.to_le_bytes()); // descsz
    note.extend(18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
    note.extend(b"Xen\0");
    note.extend((CODE_ADDR as u32).to_le_bytes());
    let code_off = note_off + note.len();

    let mut f = Vec::new();
    f.extend(b"\x7fELF");
    f.extend([2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV
    f.extend([0u8; 8]);
    f.extend(2u16.to_le_bytes()); // ET_EXEC
    f.extend(0x3eu16.to_le_bytes()); // x86-64
    f.extend(1u32.to_le_bytes());
    f.extend(CODE_ADDR.to_le_bytes()); // e_entry
    f.extend((EHDR as u64).to_le_bytes()); // e_phoff
    f.extend(0u64.to_le_bytes()); // e_shoff
    f.extend(0u32.to_le_bytes()); // flags
    f.extend((EHDR as u16).to_le_bytes());
    f.extend((PHDR as u16).to_le_bytes());
    f.extend(2u16.to_le_bytes()); // e_phnum
    f.extend([0u8; 6]); // shentsize, shnum, shstrndx
    let phdr = |f: &mut Vec<u8>, kind: u32, off: usize, addr: u64, size: usize| {
        f.extend(kind.to_le_bytes());
        f.extend(5u32.to_le_bytes()); // R+X
        f.extend((off as u64).to_le_bytes());
        f.extend(addr.to_le_bytes());
        f.extend(addr.to_le_bytes());
        f.extend((size as u64).to_le_bytes());
        f.extend((size as u64).to_le_bytes());
        f.extend(4096u64.to_le_bytes());
    };
    phdr(&mut f, 1, code_off, CODE_ADDR, code.len()); // PT_LOAD
    phdr(&mut f, 4, note_off, 0, note.len()); // PT_NOTE
    f.extend(&note);
    f.extend(code);
    f
}

struct TinyGuest {
    dir: PathBuf,
}

impl TinyGuest {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("podvisor-tiny-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TinyGuest { dir }
    }

    /// Writes `code` as the guest kernel (a PVH ELF); returns its path.
    fn kernel(&self, code: &Asm) -> PathBuf {
        let kernel = self.dir.join("guest.elf");
        std::fs::write(&kernel, pvh_elf(&code.0)).unwrap();
        kernel
    }

    /// Starts a controller for tiny guests that records its events in a file; returns the
    /// controller, its thread and the events file.
    fn controller_with_events(&self) -> (Controller, ControllerThread, PathBuf) {
        self.controller_with_events_in("events")
    }

    /// Like [`TinyGuest::controller_with_events`], its events in file `name`.
    fn controller_with_events_in(&self, name: &str) -> (Controller, ControllerThread, PathBuf) {
        let path = self.dir.join(name);
        let events = vmm::events::EventMonitor::new(std::fs::File::create(&path).unwrap());
        let (ctl, thread) = Controller::start(tiny_options(), events, false).unwrap();
        (ctl, thread, path)
    }

    /// Boots `code` with `vcpus` vCPUs; returns how the VM ended and what COM1 printed.
    fn run(&self, code: Asm, vcpus: u8) -> (Result<VmExit, vmm::Error>, Vec<u8>) {
        self.run_with(code, vcpus, |_| {})
    }

    /// Like [`TinyGuest::run`], with the VM configuration adjusted by `adjust`.
    fn run_with(
        &self,
        code: Asm,
        vcpus: u8,
        adjust: impl FnOnce(&mut VmConfig),
    ) -> (Result<VmExit, vmm::Error>, Vec<u8>) {
        let kernel = self.kernel(&code);
        let serial = self.dir.join("serial.out");
        let _ = std::fs::remove_file(&serial);
        let mut config = config(&kernel, &serial, vcpus);
        adjust(&mut config);
        let kvm = vmm::vstate::kvm::open_any().expect("/dev/kvm");
        let template = CpuTemplate::from_kvm(&kvm).unwrap();
        let console = Console::new(&config.serial).unwrap();
        let backends = vmm::backends::Backends::open(&config).unwrap();
        let vm = Vm::new(&kvm, &template, &config, &console, &backends).expect("VM setup");
        let exit = vm.run();
        drop(console);
        (exit, std::fs::read(&serial).unwrap_or_default())
    }
}

impl Drop for TinyGuest {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

type ControllerThread = std::thread::JoinHandle<Result<vmm::controller::Ended, vmm::Error>>;

/// Controller options for tiny guests (they run on PVM's `/dev/kvm` too).
fn tiny_options() -> vmm::RunOptions {
    vmm::RunOptions {
        pvm_guest: true,
        ..Default::default()
    }
}

fn config(kernel: &Path, serial: &Path, vcpus: u8) -> VmConfig {
    VmConfig {
        payload: PayloadConfig {
            kernel: kernel.to_owned(),
            initramfs: None,
            cmdline: String::new(),
        },
        cpus: CpusConfig::new(vcpus),
        memory: MemoryConfig { size: 64 << 20 },
        serial: ConsoleConfig::File(serial.to_owned()),
        disks: Vec::new(),
        net: Vec::new(),
        rng: None,
        console: None,
    }
}

/// A VM booted from a configuration outside any controller, with what it is built from (the
/// console and backends must outlive it; tests build more machines from the same parts).
struct Booted {
    kvm: kvm_ioctls::Kvm,
    template: CpuTemplate,
    console: Console,
    backends: vmm::backends::Backends,
    running: vmm::RunningVm,
}

fn boot(config: &VmConfig) -> Booted {
    let kvm = vmm::vstate::kvm::open_any().expect("/dev/kvm");
    let template = CpuTemplate::from_kvm(&kvm).unwrap();
    let console = Console::new(&config.serial).unwrap();
    let backends = vmm::backends::Backends::open(config).unwrap();
    let running = Vm::new(&kvm, &template, config, &console, &backends)
        .unwrap()
        .start()
        .unwrap();
    Booted {
        kvm,
        template,
        console,
        backends,
        running,
    }
}

/// Waits (20 s at most) until the guest has printed `bytes` bytes into `serial`.
fn wait_printed(serial: &Path, bytes: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::fs::metadata(serial).map_or(0, |m| m.len()) < bytes {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest does not print"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

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
    let mut code = Asm::default().print("x");
    let back = code.0.len() + 2;
    code.0.extend([0xeb, (256 - back) as u8]);
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
    let mut code = Asm::default().print("x");
    let back = code.0.len() + 2;
    code.0.extend([0xeb, (256 - back) as u8]);
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

/// The guest of the save/restore test: prints `a`..`z` over and over, 600 letters with a
/// short spin after each, counting them in EBX and in memory at 0x200000; then prints "ok" if
/// both counts agree (or "bad"), and powers off.
fn counting_guest() -> Asm {
    counting_guest_of(600)
}

/// [`counting_guest`] printing `count` letters.
fn counting_guest_of(count: u32) -> Asm {
    let mut a = Asm::default();
    a.0.extend([0x31, 0xdb]); // xor ebx, ebx
    let top = a.0.len();
    a.0.extend([0x89, 0xd8]); // mov eax, ebx
    a.0.extend([0x31, 0xd2]); // xor edx, edx
    a.0.extend([0xb9, 26, 0, 0, 0]); // mov ecx, 26
    a.0.extend([0xf7, 0xf1]); // div ecx
    a.0.extend([0x88, 0xd0]); // mov al, dl
    a.0.extend([0x04, b'a']); // add al, 'a'
    a = a.print_al();
    a.0.extend([0xff, 0x05, 0x00, 0x00, 0x20, 0x00]); // inc dword [0x200000]
    a.0.push(0x43); // inc ebx
    a.0.extend([0xb9, 0xd0, 0x07, 0, 0]); // mov ecx, 2000
    a.0.extend([0x49, 0x75, 0xfd]); // spin: dec ecx; jnz spin
    a.0.extend([0x81, 0xfb]); // cmp ebx, count
    a.0.extend(count.to_le_bytes());
    let back = a.0.len() + 6 - top;
    a.0.extend([0x0f, 0x85]); // jne top
    a.0.extend((-(back as i32)).to_le_bytes());
    a.0.extend([0x3b, 0x1d, 0x00, 0x00, 0x20, 0x00]); // cmp ebx, [0x200000]
    let bad = Asm::default().print("\nbad\n").poweroff();
    a.0.extend([0x74, bad.0.len() as u8]); // je ok
    a.0.extend(bad.0);
    a.print("\nok\n").poweroff()
}

/// The counting guest's configuration, 2 vCPUs, COM1 into `serial.out`, with a virtio-rng
/// so the PCI segment has a function to save and restore; and the serial file.
fn counting_config(g: &TinyGuest) -> (VmConfig, PathBuf) {
    let kernel = g.kernel(&counting_guest());
    let serial = g.dir.join("serial.out");
    let mut config = config(&kernel, &serial, 2);
    config.rng = Some(RngConfig {
        src: "/dev/urandom".into(),
    });
    (config, serial)
}

/// What the counting guest prints from start to end.
fn counting_guest_output() -> Vec<u8> {
    counting_guest_output_of(600)
}

fn counting_guest_output_of(count: u32) -> Vec<u8> {
    let mut out: Vec<u8> = (0..count).map(|i| b'a' + (i % 26) as u8).collect();
    out.extend(b"\nok\n");
    out
}

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
    let backends2 = vmm::backends::Backends::open(&config2).unwrap();
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
        &vmm::backends::Backends::open(&rng_config).unwrap(),
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
    use vmm::controller::{ControlError, Reply, Request};
    use vmm::lifecycle::VmState;

    let g = TinyGuest::new("snapshot");
    let (cfg, serial) = counting_config(&g);
    let snap = g.dir.join("snap");
    let state = |ctl: &Controller| match ctl.handle(Request::Info) {
        Ok(Reply::Info { state, .. }) => Some(state),
        _ => None,
    };
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
        let err = match ctl.handle(Request::Restore(copy)) {
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
    ctl.handle(Request::Restore(snap.clone())).unwrap();
    assert_eq!(state(&ctl), Some(VmState::Paused));
    assert!(
        matches!(
            ctl.handle(Request::Restore(snap.clone())),
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
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while state(&ctl) != Some(VmState::Shutdown) {
        assert!(
            std::time::Instant::now() < deadline,
            "the restored guest does not finish: {:?}, {} bytes printed",
            state(&ctl),
            std::fs::read(&serial).unwrap().len(),
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
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

/// A destination that breaks off at `cut`: 0 closes at once, 1 after HELLO, 2 in the middle
/// of the memory, 3 answers the machine state with an error, 4 closes instead of confirming
/// that the guest runs.
fn broken_destination(socket: PathBuf, cut: u32) -> std::thread::JoinHandle<()> {
    use vmm::migration::protocol::{self, Kind};
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let _ = std::fs::remove_file(&socket);
        if cut == 0 {
            return;
        }
        let mut frames = 0;
        while let Ok(frame) = protocol::read_frame(&mut s) {
            frames += 1;
            match frame.kind {
                Kind::Hello if cut == 1 => return,
                Kind::Hello | Kind::Config => {
                    protocol::write_frame(&mut s, Kind::Ack, &[]).unwrap()
                }
                Kind::Memory if cut == 2 && frames > 3 => return,
                Kind::State if cut == 3 => {
                    protocol::write_frame(&mut s, Kind::Error, b"injected failure").unwrap();
                    return;
                }
                Kind::State => protocol::write_frame(&mut s, Kind::Ack, &[]).unwrap(),
                Kind::Complete => return,
                _ => {}
            }
        }
    })
}

#[test]
fn live_migration_moves_a_busy_guest_and_any_failure_leaves_it_running_at_the_source() {
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
    let state = |ctl: &Controller| match ctl.handle(Request::Info) {
        Ok(Reply::Info { state, .. }) => Some(state),
        _ => None,
    };
    let printed = || std::fs::metadata(&serial).map_or(0, |m| m.len());
    let (source, source_thread, events) = g.controller_with_events();
    source
        .handle(Request::Create(Box::new(cfg.clone())))
        .unwrap();
    source.handle(Request::Boot).unwrap();
    wait_printed(&serial, 100);

    // Every broken destination: the migration fails with a reason, the guest runs on at the
    // source (it keeps printing) and the next attempt is possible.
    let options = SendOptions {
        downtime_limit_ms: 50,
        ..SendOptions::default()
    };
    for cut in 0..5 {
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
        assert_eq!(state(&source), Some(VmState::Running), "cut {cut}: {err}");
        let now = printed();
        wait_printed(&serial, now + 20);
    }
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

    // A real destination takes the guest while it runs; it finishes its count there, its
    // memory (counted beside a register) consistent, its output whole and once.
    let (dest, dest_thread, dest_events) = g.controller_with_events_in("dest-events");
    let socket = g.dir.join("dest.sock");
    let receiving = {
        let dest = dest.clone();
        let endpoint = Endpoint::Unix(socket.clone());
        std::thread::spawn(move || dest.handle(Request::ReceiveMigration(endpoint)))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !socket.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the destination does not listen"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let before = printed();
    source
        .handle(Request::SendMigration(
            Endpoint::Unix(socket.clone()),
            options,
        ))
        .unwrap();
    receiving.join().unwrap().unwrap();
    assert_eq!(
        state(&source),
        None,
        "the source has no VM after the migration"
    );
    assert!(!socket.exists(), "the destination's socket is gone");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while state(&dest) != Some(VmState::Shutdown) {
        assert!(
            std::time::Instant::now() < deadline,
            "the migrated guest does not finish: {:?}, {} bytes printed",
            state(&dest),
            printed()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(
        before < u64::from(COUNT),
        "migrated before the guest finished ({before} letters printed)"
    );
    for (ctl, thread) in [(source, source_thread), (dest, dest_thread)] {
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
    // The source's last event has the migration's figures.
    let last: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(g.dir.join("events"))
            .unwrap()
            .lines()
            .rfind(|l| l.contains("migration-completed"))
            .expect("the source's migration-completed event"),
    )
    .unwrap();
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
    let g = TinyGuest::new("throttle");
    let kernel = g.kernel(&counting_guest_of(1_000_000));
    let serial = g.dir.join("serial.out");
    let booted = boot(&config(&kernel, &serial, 1));
    let vm = &booted.running;
    wait_printed(&serial, 10);
    let printed = || std::fs::metadata(&serial).map_or(0, |m| m.len());
    let rate = || {
        let start = printed();
        std::thread::sleep(std::time::Duration::from_millis(800));
        printed() - start
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
        throttled * 3 < free.max(again),
        "letters per 0.8 s: {free} free, {throttled} at 90% throttle, {again} after"
    );
    booted.running.stop();
}
