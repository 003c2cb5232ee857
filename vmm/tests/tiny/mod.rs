//! What the tiny-guest tests share: a minimal x86 assembler, PVH ELF images around its code,
//! VM configurations, booting outside and inside a controller, and the counting guest of the
//! save/restore and migration tests. (Each test file uses some of it.)
#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub use vmm::config::{
    ConsoleConfig, CpusConfig, MemoryConfig, PayloadConfig, RngConfig, VmConfig,
};
pub use vmm::controller::Controller;
pub use vmm::vstate::vcpu::CpuTemplate;
pub use vmm::{Console, Vm, VmExit};

/// Where the guest code is loaded and entered (32-bit protected mode, paging off).
pub const CODE_ADDR: u64 = 0x10_0000;

/// A minimal x86 assembler for 32-bit protected mode: just what the tests need.
#[derive(Default)]
pub struct Asm(pub Vec<u8>);

impl Asm {
    pub fn mov_dx(mut self, v: u16) -> Self {
        self.0.extend([0x66, 0xba]);
        self.0.extend(v.to_le_bytes());
        self
    }
    pub fn mov_al(mut self, v: u8) -> Self {
        self.0.extend([0xb0, v]);
        self
    }
    pub fn out_dx_al(mut self) -> Self {
        self.0.push(0xee);
        self
    }
    pub fn out_dx_eax(mut self) -> Self {
        self.0.push(0xef);
        self
    }
    /// `mov eax, imm32`
    pub fn mov_eax(mut self, v: u32) -> Self {
        self.0.push(0xb8);
        self.0.extend(v.to_le_bytes());
        self
    }
    pub fn in_al_dx(mut self) -> Self {
        self.0.push(0xec);
        self
    }
    /// `mov eax, [addr]`
    pub fn load_eax(mut self, addr: u32) -> Self {
        self.0.push(0xa1);
        self.0.extend(addr.to_le_bytes());
        self
    }
    /// `mov eax, [ebx + disp8]`
    pub fn load_eax_ebx(mut self, disp: u8) -> Self {
        self.0.extend([0x8b, 0x43, disp]);
        self
    }
    /// `mov eax, leaf; mov ecx, subleaf; cpuid`
    pub fn cpuid(mut self, leaf: u32, subleaf: u32) -> Self {
        self = self.mov_eax(leaf);
        self.0.push(0xb9);
        self.0.extend(subleaf.to_le_bytes());
        self.0.extend([0x0f, 0xa2]);
        self
    }
    /// `mov eax, ebx`
    pub fn mov_eax_ebx(mut self) -> Self {
        self.0.extend([0x89, 0xd8]);
        self
    }
    /// `shr eax, n`
    pub fn shr_eax(mut self, n: u8) -> Self {
        self.0.extend([0xc1, 0xe8, n]);
        self
    }
    pub fn out_port(self, port: u16, value: u8) -> Self {
        self.mov_dx(port).mov_al(value).out_dx_al()
    }
    pub fn in_port(self, port: u16) -> Self {
        self.mov_dx(port).in_al_dx()
    }
    /// Writes AL to COM1.
    pub fn print_al(self) -> Self {
        self.mov_dx(0x3f8).out_dx_al()
    }
    pub fn print(mut self, s: &str) -> Self {
        for b in s.bytes() {
            self = self.out_port(0x3f8, b);
        }
        self
    }
    /// Powers off through the ACPI sleep control register (SLP_TYP=5, SLP_EN).
    pub fn poweroff(self) -> Self {
        self.out_port(0x600, 0x34).halt_forever()
    }
    /// Prints `ch` on COM1 over and over, forever (the VMM ends it).
    pub fn print_forever(ch: char) -> Self {
        let mut code = Asm::default().print(&ch.to_string());
        let back = code.0.len() + 2;
        code.0.extend([0xeb, (256 - back) as u8]); // jmp back to the start
        code
    }
    pub fn halt_forever(mut self) -> Self {
        self.0.extend([0xf4, 0xeb, 0xfd]);
        self
    }
}

/// Emitting into a program being built (the hostile and durability guests write memory and
/// device registers directly).
impl Asm {
    /// Raw machine code.
    pub fn bytes(&mut self, b: &[u8]) {
        self.0.extend(b);
    }
    /// `mov dword [addr], value`
    pub fn store32(&mut self, addr: u32, value: u32) {
        self.bytes(&[0xc7, 0x05]);
        self.bytes(&addr.to_le_bytes());
        self.bytes(&value.to_le_bytes());
    }
    /// `mov word [addr], value`
    pub fn store16(&mut self, addr: u32, value: u16) {
        self.bytes(&[0x66, 0xc7, 0x05]);
        self.bytes(&addr.to_le_bytes());
        self.bytes(&value.to_le_bytes());
    }
    /// Two `mov dword` (low, then high half).
    pub fn store64(&mut self, addr: u32, value: u64) {
        self.store32(addr, value as u32);
        self.store32(addr + 4, (value >> 32) as u32);
    }
    /// `mov byte/word/dword [ebx + off], value`, by `size` (EBX holds a BAR address).
    pub fn bar_store(&mut self, off: u32, size: u8, value: u32) {
        match size {
            1 => {
                self.bytes(&[0xc6, 0x83]);
                self.bytes(&off.to_le_bytes());
                self.bytes(&[value as u8]);
            }
            2 => {
                self.bytes(&[0x66, 0xc7, 0x83]);
                self.bytes(&off.to_le_bytes());
                self.bytes(&(value as u16).to_le_bytes());
            }
            _ => {
                self.bytes(&[0xc7, 0x83]);
                self.bytes(&off.to_le_bytes());
                self.bytes(&value.to_le_bytes());
            }
        }
    }
}

/// Wraps `code` in an ELF64 image with one PT_LOAD at [`CODE_ADDR`] and a Xen PVH entry note.
pub fn pvh_elf(code: &[u8]) -> Vec<u8> {
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

pub struct TinyGuest {
    pub dir: PathBuf,
}

impl TinyGuest {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("podvisor-tiny-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TinyGuest { dir }
    }

    /// Writes `code` as the guest kernel (a PVH ELF); returns its path.
    pub fn kernel(&self, code: &Asm) -> PathBuf {
        let kernel = self.dir.join("guest.elf");
        std::fs::write(&kernel, pvh_elf(&code.0)).unwrap();
        kernel
    }

    /// Starts a controller for tiny guests that records its events in a file; returns the
    /// controller, its thread and the events file.
    pub fn controller_with_events(&self) -> (Controller, ControllerThread, PathBuf) {
        self.controller_with_events_in("events")
    }

    /// Like [`TinyGuest::controller_with_events`], its events in file `name`.
    pub fn controller_with_events_in(&self, name: &str) -> (Controller, ControllerThread, PathBuf) {
        let path = self.dir.join(name);
        let events = vmm::events::EventMonitor::new(std::fs::File::create(&path).unwrap());
        let (ctl, thread) = Controller::start(tiny_options(), events, false).unwrap();
        (ctl, thread, path)
    }

    /// Boots `code` with `vcpus` vCPUs; returns how the VM ended and what COM1 printed.
    pub fn run(&self, code: Asm, vcpus: u8) -> (Result<VmExit, vmm::Error>, Vec<u8>) {
        self.run_with(code, vcpus, |_| {})
    }

    /// Like [`TinyGuest::run`], with the VM configuration adjusted by `adjust`.
    pub fn run_with(
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
        let backends = vmm::backends::Backends::open(&mut config.clone()).unwrap();
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

pub type ControllerThread = std::thread::JoinHandle<Result<vmm::controller::Ended, vmm::Error>>;

/// Controller options for tiny guests (they run on PVM's `/dev/kvm` too).
pub fn tiny_options() -> vmm::RunOptions {
    vmm::RunOptions {
        pvm_guest: true,
        ..Default::default()
    }
}

pub fn config(kernel: &Path, serial: &Path, vcpus: u8) -> VmConfig {
    VmConfig {
        payload: PayloadConfig {
            kernel: Some(kernel.to_owned()),
            initramfs: None,
            cmdline: String::new(),
            boot_entry: None,
        },
        cpus: CpusConfig::new(vcpus),
        memory: MemoryConfig::new(64 << 20),
        serial: ConsoleConfig::File(serial.to_owned()),
        disks: Vec::new(),
        net: Vec::new(),
        rng: None,
        console: None,
        platform: None,
    }
}

/// A VM booted from a configuration outside any controller, with what it is built from (the
/// console and backends must outlive it; tests build more machines from the same parts).
pub struct Booted {
    pub kvm: kvm_ioctls::Kvm,
    pub template: CpuTemplate,
    pub console: Console,
    pub backends: vmm::backends::Backends,
    pub running: vmm::RunningVm,
}

pub fn boot(config: &VmConfig) -> Booted {
    let kvm = vmm::vstate::kvm::open_any().expect("/dev/kvm");
    let template = CpuTemplate::from_kvm(&kvm).unwrap();
    let console = Console::new(&config.serial).unwrap();
    let backends = vmm::backends::Backends::open(&mut config.clone()).unwrap();
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
pub fn wait_printed(serial: &Path, bytes: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::fs::metadata(serial).map_or(0, |m| m.len()) < bytes {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest does not print"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The guest of the save/restore test: prints `a`..`z` over and over, 600 letters with a
/// short spin after each, counting them in EBX and in memory at 0x200000; then prints "ok" if
/// both counts agree and every number's own page (below) holds it (or "bad"), and powers off.
pub fn counting_guest() -> Asm {
    counting_guest_of(600)
}

/// [`counting_guest`] printing `count` letters.
pub fn counting_guest_of(count: u32) -> Asm {
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
                    // Each number also goes, once, into a page of its own (number N at 0x2ff000 + N * 4096):
                    // pages written once while memory is copied must arrive too.
    a = a.mov_eax_ebx();
    a.0.extend([0xc1, 0xe0, 0x0c]); // shl eax, 12
    a.0.extend([0x89, 0x98, 0x00, 0xf0, 0x2f, 0x00]); // mov [eax + 0x2ff000], ebx
    a.0.extend([0xb9, 0xd0, 0x07, 0, 0]); // mov ecx, 2000
    a.0.extend([0x49, 0x75, 0xfd]); // spin: dec ecx; jnz spin
    a.0.extend([0x81, 0xfb]); // cmp ebx, count
    a.0.extend(count.to_le_bytes());
    let back = a.0.len() + 6 - top;
    a.0.extend([0x0f, 0x85]); // jne top
    a.0.extend((-(back as i32)).to_le_bytes());
    a.0.extend([0xb9, 1, 0, 0, 0]); // mov ecx, 1
    a.0.extend([0x89, 0xc8]); // check: mov eax, ecx
    a.0.extend([0xc1, 0xe0, 0x0c]); // shl eax, 12
    a.0.extend([0x39, 0x88, 0x00, 0xf0, 0x2f, 0x00]); // cmp [eax + 0x2ff000], ecx
    a.0.extend([0x75, 13]); // jne bad
    a.0.push(0x41); // inc ecx
    a.0.extend([0x39, 0xd9]); // cmp ecx, ebx
    a.0.extend([0x76, (-18i8) as u8]); // jbe check
    a.0.extend([0x3b, 0x1d, 0x00, 0x00, 0x20, 0x00]); // cmp ebx, [0x200000]
    let bad = Asm::default().print("\nbad\n").poweroff();
    a.0.extend([0x74, bad.0.len() as u8]); // je ok
    a.0.extend(bad.0);
    a.print("\nok\n").poweroff()
}

/// The counting guest's configuration, 2 vCPUs, COM1 into `serial.out`, with a virtio-rng
/// so the PCI segment has a function to save and restore; and the serial file.
pub fn counting_config(g: &TinyGuest) -> (VmConfig, PathBuf) {
    let kernel = g.kernel(&counting_guest());
    let serial = g.dir.join("serial.out");
    let mut config = config(&kernel, &serial, 2);
    config.rng = Some(RngConfig {
        src: "/dev/urandom".into(),
    });
    (config, serial)
}

/// What the counting guest prints from start to end.
pub fn counting_guest_output() -> Vec<u8> {
    counting_guest_output_of(600)
}

pub fn counting_guest_output_of(count: u32) -> Vec<u8> {
    let mut out: Vec<u8> = (0..count).map(|i| b'a' + (i % 26) as u8).collect();
    out.extend(b"\nok\n");
    out
}
