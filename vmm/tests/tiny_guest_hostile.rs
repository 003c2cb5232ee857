//! A hostile guest under real KVM (issue 15): a tiny guest, generated from a seeded random
//! sequence, drives podvisor's virtio-pci functions (two virtio-blk disks, one read-only, and
//! a virtio-rng) the way a malicious driver would — random values into every register of
//! their BARs and configuration space, MSI-X entries, descriptor loops, chains that leave
//! guest RAM, indirect tables of 4 GiB, resets in the middle of I/O, notifications of queues
//! that do not exist — and floods the serial port. Meanwhile the host pauses and resumes the
//! VM and asks for its state and counters over and over. The VMM must answer each of those
//! promptly (`vm.info` within 100 ms, the others within 2 s), never crash or stall, let the
//! guest run to its end (it prints `survived` and powers off), leave the read-only disk's file
//! untouched and the writable one its size. The VM's threads run under their seccomp
//! filters, as in a VMM process.
//! Runs on any `/dev/kvm`, PVM included (see tiny_guest.rs).

mod tiny;

use std::time::{Duration, Instant};

use tiny::*;
use vmm::controller::{Reply, Request};
use vmm::lifecycle::VmState;

/// ECAM (MMCONFIG) base of bus 0: function `dev`.0's configuration space is at
/// `ECAM + dev << 15`.
const ECAM: u32 = 0xe000_0000;
/// Where the VMM places BARs (vmm::layout::PCI_BAR_WINDOW): BAR-relative accesses stay in it
/// whatever a hostile write made of a BAR, so none reaches the local APIC (an INIT there would
/// only stop the guest's own program).
const BAR_WINDOW: (u32, u32) = (0xc000_0000, 0x2000_0000);
/// Guest RAM the hostile program puts rings, descriptors and buffers in (its code is below).
const DATA: (u64, u64) = (0x40_0000, 0x2c0_0000);
const RAM: u64 = 64 << 20;

/// xorshift64*: a seeded, reproducible sequence.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
    /// A guest-physical address a hostile driver might name: in the data area (where the
    /// device may write: never the program's own code), just below the end of RAM, past it,
    /// or far beyond any memory.
    fn address(&mut self) -> u64 {
        match self.below(6) {
            0 => RAM - self.below(64),
            1 => RAM + self.below(1 << 20),
            2 => u64::MAX - self.below(1 << 16),
            3 => 0x1_0000_0000 + self.below(1 << 30),
            _ => DATA.0 + self.below(DATA.1 - DATA.0 - 0x1000),
        }
    }
    /// A length: tiny, page-sized, just under 4 GiB, or anything.
    fn length(&mut self) -> u32 {
        match self.below(4) {
            0 => self.below(64) as u32,
            1 => 4096,
            2 => u32::MAX - self.below(32) as u32,
            _ => self.next() as u32,
        }
    }
}

/// The hostile program's instructions (32-bit protected mode, paging off, interrupts off).
#[derive(Default)]
struct Program(Asm);

impl std::ops::Deref for Program {
    type Target = Asm;
    fn deref(&self) -> &Asm {
        &self.0
    }
}

impl std::ops::DerefMut for Program {
    fn deref_mut(&mut self) -> &mut Asm {
        &mut self.0
    }
}

impl Program {
    /// EBX = BAR0 of function `dev`, folded into the BAR window.
    fn bar0_to_ebx(&mut self, dev: u32) {
        self.bytes(&[0x8b, 0x1d]); // mov ebx, [ECAM + dev << 15 + 0x10]
        self.bytes(&(ECAM + (dev << 15) + 0x10).to_le_bytes());
        self.bytes(&[0x81, 0xe3]); // and ebx, window mask
        self.bytes(&((BAR_WINDOW.1 - 1) & !0xf).to_le_bytes());
        self.bytes(&[0x81, 0xcb]); // or ebx, window base
        self.bytes(&BAR_WINDOW.0.to_le_bytes());
    }
    /// `mov eax, [ebx + off]`: a read (the device's registers answer reads too).
    fn bar_load(&mut self, off: u32) {
        self.bytes(&[0x8b, 0x83]);
        self.bytes(&off.to_le_bytes());
    }
    /// Writes `count` bytes to COM1 in a loop.
    fn flood_serial(&mut self, count: u32) {
        self.0 = std::mem::take(&mut self.0).mov_dx(0x3f8);
        self.bytes(&[0xb9]); // mov ecx, count
        self.bytes(&count.to_le_bytes());
        self.bytes(&[0xb0, b'.', 0xee, 0x49, 0x75, 0xfa]); // l: mov al,'.'; out dx,al; dec ecx; jnz l
    }
}

/// Virtio common configuration (virtio 1.x, 4.1.4.3).
mod common {
    pub const DRIVER_FEATURE_SELECT: u32 = 0x08;
    pub const DRIVER_FEATURE: u32 = 0x0c;
    pub const MSIX_CONFIG: u32 = 0x10;
    pub const DEVICE_STATUS: u32 = 0x14;
    pub const QUEUE_SELECT: u32 = 0x16;
    pub const QUEUE_SIZE: u32 = 0x18;
    pub const QUEUE_MSIX_VECTOR: u32 = 0x1a;
    pub const QUEUE_ENABLE: u32 = 0x1c;
    pub const QUEUE_DESC: u32 = 0x20;
    pub const QUEUE_DRIVER: u32 = 0x28;
    pub const QUEUE_DEVICE: u32 = 0x30;
}
/// podvisor's virtio-pci BAR0 layout (devices/src/virtio/pci/mod.rs).
const NOTIFY: u32 = 0x3000;
const MSIX_TABLE: u32 = 0x4000;
const BAR_SIZE: u32 = 0x8000;

/// One round against function `dev`: set a queue up (mostly as a driver would, sometimes
/// not), fill its rings with hostile requests, notify, scribble over the BAR and the
/// configuration space, maybe reset in the middle.
fn round(p: &mut Program, rng: &mut Rng, dev: u32, ring: u64) {
    use common::*;
    let cfg = ECAM + (dev << 15);
    p.store16(cfg + 4, 0x0006); // memory decoding and bus mastering
    p.bar0_to_ebx(dev);
    p.bar_store(DEVICE_STATUS, 1, 0); // reset
    p.bar_store(DEVICE_STATUS, 1, 1 | 2); // ACKNOWLEDGE | DRIVER
    p.bar_store(DRIVER_FEATURE_SELECT, 4, 1);
    p.bar_store(DRIVER_FEATURE, 4, 1); // VIRTIO_F_VERSION_1
    p.bar_store(DRIVER_FEATURE_SELECT, 4, 0);
    let features = if rng.one_in(4) { rng.next() as u32 } else { 0 };
    p.bar_store(DRIVER_FEATURE, 4, features);
    p.bar_store(DEVICE_STATUS, 1, 1 | 2 | 8); // FEATURES_OK
    let queue = if rng.one_in(4) {
        rng.below(70) as u32
    } else {
        0
    };
    let size: u32 = if rng.one_in(5) {
        rng.next() as u32 & 0xffff
    } else {
        1 << rng.below(9)
    };
    let (desc, avail, used) = if rng.one_in(5) {
        (rng.address(), rng.address(), rng.address())
    } else {
        (ring, ring + 0x1000, ring + 0x2000)
    };
    p.bar_store(QUEUE_SELECT, 2, queue);
    p.bar_store(QUEUE_SIZE, 2, size);
    p.bar_store(QUEUE_MSIX_VECTOR, 2, rng.below(4) as u32);
    p.bar_store(MSIX_CONFIG, 2, rng.below(4) as u32);
    for (reg, addr) in [
        (QUEUE_DESC, desc),
        (QUEUE_DRIVER, avail),
        (QUEUE_DEVICE, used),
    ] {
        p.bar_store(reg, 4, addr as u32);
        p.bar_store(reg + 4, 4, (addr >> 32) as u32);
    }
    // MSI-X entries: random vectors and masks, fixed delivery to a LAPIC (the guest runs
    // with interrupts off; an NMI or INIT would only end its own program).
    for _ in 0..rng.below(4) {
        let entry = MSIX_TABLE + 16 * rng.below(8) as u32;
        p.bar_store(entry, 4, 0xfee0_0000 | ((rng.below(4) as u32) << 12));
        p.bar_store(entry + 4, 4, 0);
        p.bar_store(entry + 8, 4, (rng.next() as u32) & 0xff);
        p.bar_store(entry + 12, 4, rng.below(2) as u32);
    }
    p.bar_store(QUEUE_ENABLE, 2, 1);
    // Enable MSI-X (or not) through the capability's control word, found by podvisor's
    // layout at a fixed offset would be cheating: a random write to the capability area.
    p.store16(cfg + 0x40 + 2 * rng.below(32) as u32, rng.next() as u16);
    p.bar_store(DEVICE_STATUS, 1, 1 | 2 | 8 | 4); // DRIVER_OK

    hostile_requests(p, rng, ring, size.min(256));

    // Notify the queue, and others (some that do not exist).
    for _ in 0..=rng.below(3) {
        let q = if rng.one_in(3) {
            rng.below(80) as u32
        } else {
            queue
        };
        p.bar_store(NOTIFY + 4 * q, 2, q);
    }
    if rng.one_in(4) {
        // A reset while the device may be serving the requests.
        p.bar_store(DEVICE_STATUS, 1, 0);
    }
    // Random values into random registers of the BAR, and reads.
    for _ in 0..rng.below(24) {
        let off = rng.below(u64::from(BAR_SIZE)) as u32 & !3;
        p.bar_store(off, 1 << rng.below(3), rng.next() as u32);
        if rng.one_in(3) {
            p.bar_load(rng.below(u64::from(BAR_SIZE)) as u32 & !3);
        }
    }
    // And into the configuration space (the BAR registers included: the next round reads
    // back wherever this one moved BAR0).
    for _ in 0..rng.below(6) {
        let off = rng.below(0x100) as u32 & !3;
        p.store32(cfg + off, rng.next() as u32);
    }
    if rng.one_in(8) {
        p.flood_serial(1 + rng.below(4000) as u32);
    }
}

/// Fills a split virtqueue at `ring` (descriptors, then the available ring a page above) with
/// requests a malicious driver would make: loops, chains out of RAM, 4 GiB indirect tables,
/// virtio-blk requests of any type and length.
fn hostile_requests(p: &mut Program, rng: &mut Rng, ring: u64, size: u32) {
    const NEXT: u16 = 1;
    const WRITE: u16 = 2;
    const INDIRECT: u16 = 4;
    let size = size.max(1);
    let header = ring + 0x3000; // request headers and buffers
    let desc = |p: &mut Program, i: u32, addr: u64, len: u32, flags: u16, next: u16| {
        let at = (ring + 16 * u64::from(i % size)) as u32;
        p.store64(at, addr);
        p.store32(at + 8, len);
        p.store32(at + 12, u32::from(flags) | (u32::from(next) << 16));
    };
    let count = 1 + rng.below(8) as u32;
    // A device may give up on a queue at its first malformed request: a third of the
    // rounds make only well-formed reads, writes and flushes, whose data paths then run
    // under the same resets, register writes and pauses.
    let clean = rng.one_in(3);
    for i in 0..count {
        let kind = if clean { 3 } else { rng.below(6) };
        let i = i * 3;
        match kind {
            // A loop: i -> i+1 -> i.
            0 => {
                desc(p, i, header, 16, NEXT, ((i + 1) % size) as u16);
                desc(
                    p,
                    i + 1,
                    rng.address(),
                    rng.length(),
                    NEXT | WRITE,
                    (i % size) as u16,
                );
            }
            // An indirect table of (nearly) 4 GiB, or one somewhere else.
            1 => desc(p, i, rng.address(), !15, INDIRECT, 0),
            // A chain that leaves RAM.
            2 => {
                desc(p, i, header, 16, NEXT, ((i + 1) % size) as u16);
                desc(p, i + 1, RAM - 8, 64, NEXT | WRITE, ((i + 2) % size) as u16);
                desc(p, i + 2, u64::MAX - 7, 1, WRITE, 0);
            }
            // A virtio-blk request of a random type (read, write, flush, get-id, discard,
            // write-zeroes, or none) over a random sector and length.
            _ => {
                let types = [0u32, 1, 4, 8, 11, 13, rng.next() as u32];
                let ty = if clean {
                    types[rng.below(3) as usize]
                } else {
                    types[rng.below(types.len() as u64) as usize]
                };
                let h = header + 64 * u64::from(i % 32);
                p.store32(h as u32, ty);
                p.store32(h as u32 + 4, 0);
                // Half of them within the disks (1 MiB), to reach the data paths.
                let valid = clean || rng.one_in(2);
                let sector = if valid {
                    rng.below(2040)
                } else {
                    rng.next() >> rng.below(64)
                };
                p.store64(h as u32 + 8, sector);
                // Discard / write-zeroes segments: a sector, a count, flags.
                p.store64(h as u32 + 16, rng.next() >> rng.below(64));
                p.store32(h as u32 + 24, rng.next() as u32);
                p.store32(h as u32 + 28, rng.next() as u32);
                // A valid read's buffer is the device's to write, a write's the device's to read.
                let data_flags = match (valid, ty) {
                    (true, 0) => WRITE,
                    (true, 1) => 0,
                    _ if rng.one_in(2) => WRITE,
                    _ => 0,
                };
                desc(p, i, h, 16, NEXT, ((i + 1) % size) as u16);
                let (addr, len) = if valid {
                    (
                        DATA.0 + 0x100_0000 + rng.below(0x10_0000),
                        512 * (1 + rng.below(16) as u32),
                    )
                } else {
                    (rng.address(), rng.length())
                };
                desc(
                    p,
                    i + 1,
                    addr,
                    len,
                    NEXT | data_flags,
                    ((i + 2) % size) as u16,
                );
                desc(p, i + 2, DATA.0 + rng.below(0x1000), 1, WRITE, 0);
            }
        }
    }
    // The available ring: flags, idx, then heads (some out of range).
    let avail = (ring + 0x1000) as u32;
    for slot in 0..count {
        let head = if rng.one_in(6) {
            rng.next() as u16
        } else {
            (slot * 3 % size) as u16
        };
        p.store16(avail + 4 + 2 * (slot % size), head);
    }
    let idx = if rng.one_in(6) {
        rng.next() as u16
    } else {
        count as u16
    };
    p.store16(avail, 0);
    p.store16(avail + 2, idx);
}

/// The whole program for `seed`: `rounds` rounds against functions 1-4, then `survived`.
fn hostile_guest(seed: u64, rounds: u32) -> Asm {
    let mut rng = Rng(seed | 1);
    let mut p = Program::default();
    for r in 0..rounds {
        let dev = 1 + rng.below(4) as u32;
        // Each function's rings in their own part of the data area.
        let ring = DATA.0 + u64::from(dev) * 0x10_0000 + u64::from(r % 4) * 0x4000;
        round(&mut p, &mut rng, dev, ring);
    }
    p.0.print("survived\n").poweroff()
}

/// As in a VMM process: the VM's threads (VM thread, vCPUs, device workers, console) run
/// under their seccomp filters, and a call outside them ends this test binary with SIGSYS.
fn filtered() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| vmm::seccomp::init(vmm::seccomp::Mode::On).unwrap());
}

/// A console-socket client gets the guest's output straight from the vCPU that writes the
/// UART (a non-blocking send), under the vCPU's filter.
#[test]
fn a_console_socket_client_reads_the_guest_under_seccomp() {
    use std::io::Read;
    filtered();
    let g = TinyGuest::new("hostile-console");
    // Print 'x' forever.
    let code = Asm::print_forever('x');
    let kernel = g.kernel(&code);
    let socket = g.dir.join("console.sock");
    let mut cfg = config(&kernel, &g.dir.join("unused"), 1);
    cfg.serial = vmm::config::ConsoleConfig::Socket(socket.clone());
    let (ctl, thread, _) = g.controller_with_events();
    ctl.handle(Request::Create(Box::new(cfg))).unwrap();
    ctl.handle(Request::Boot).unwrap();
    let mut client = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // Past the output kept from before the client came: what the vCPU sends now.
    let mut seen = 0;
    let mut buf = [0u8; 4096];
    while seen < 64 << 10 {
        let n = client.read(&mut buf).unwrap();
        assert!(n > 0 && buf[..n].iter().all(|b| *b == b'x'), "{n}");
        seen += n;
    }
    ctl.handle(Request::ShutdownVmm).unwrap();
    thread.join().unwrap().unwrap();
}

#[test]
fn a_hostile_driver_cannot_crash_stall_or_reach_past_its_disks() {
    filtered();
    for seed in [0x5eed_0001_u64, 0xdead_beef] {
        let g = TinyGuest::new(&format!("hostile-{seed:x}"));
        let kernel = g.kernel(&hostile_guest(seed, 400));
        let serial = g.dir.join("serial.out");
        let ro = g.dir.join("ro.raw");
        let rw = g.dir.join("rw.raw");
        let pattern: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + 3) as u8).collect();
        std::fs::write(&ro, &pattern).unwrap();
        std::fs::write(&rw, vec![0u8; 1 << 20]).unwrap();
        let mut cfg = config(&kernel, &serial, 2);
        cfg.memory = vmm::config::MemoryConfig::new(RAM);
        cfg.disks = vec![
            vmm::config::DiskConfig::parse(&format!("path={},readonly=on", ro.display())).unwrap(),
            vmm::config::DiskConfig::parse(&format!("path={},format=raw", rw.display())).unwrap(),
        ];
        cfg.rng = Some(RngConfig::default());

        let (ctl, thread, _) = g.controller_with_events();
        ctl.handle(Request::Create(Box::new(cfg))).unwrap();
        ctl.handle(Request::Boot).unwrap();
        // Control calls while the guest attacks: each answered promptly, until it ends.
        let started = Instant::now();
        let mut slowest = Duration::ZERO;
        let mut calls = 0;
        let mut slowest_info = Duration::ZERO;
        let mut counters = Default::default();
        let ended = loop {
            let asked = Instant::now();
            let state = match ctl.handle(Request::Info) {
                Ok(Reply::Info { state, .. }) => state,
                other => panic!("seed {seed:x}: vm.info: {other:?}"),
            };
            slowest_info = slowest_info.max(asked.elapsed());
            if state == VmState::Shutdown {
                break true;
            }
            if started.elapsed() > Duration::from_secs(120) {
                break false;
            }
            for request in [Request::Pause, Request::Counters, Request::Resume] {
                let t = Instant::now();
                // The guest may end between two calls: a state error then, nothing else.
                match ctl.handle(request) {
                    Ok(Reply::Counters(c)) if !c.is_empty() => counters = c,
                    Ok(_) | Err(vmm::controller::ControlError::WrongState(_)) => {}
                    Err(e) => panic!("seed {seed:x}: {e}"),
                }
                slowest = slowest.max(t.elapsed());
                calls += 1;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let out = String::from_utf8_lossy(&std::fs::read(&serial).unwrap_or_default()).into_owned();
        ctl.handle(Request::ShutdownVmm).unwrap();
        thread.join().unwrap().unwrap();
        assert!(
            ended,
            "seed {seed:x}: the guest did not end within 120 s: {out:.200}"
        );
        assert!(
            out.ends_with("survived\n"),
            "seed {seed:x}: {}",
            &out[out.len().saturating_sub(200)..]
        );
        assert!(
            slowest < Duration::from_secs(2),
            "seed {seed:x}: a control call took {slowest:?} ({calls} calls)"
        );
        assert!(calls >= 3, "seed {seed:x}: {calls} control calls");
        // vm.info answers from the state the VM thread published: never behind the guest.
        assert!(
            slowest_info < Duration::from_millis(100),
            "seed {seed:x}: vm.info took {slowest_info:?}"
        );
        // The attack reached the devices' data paths, and was turned away there too.
        let count = |dev: &str, name: &str| counters.get(dev).and_then(|c| c.get(name)).copied();
        let served =
            |dev: &str| count(dev, "read_ops").unwrap_or(0) + count(dev, "write_ops").unwrap_or(0);
        assert!(
            served("_disk0") + served("_disk1") > 0,
            "seed {seed:x}: {counters:?}"
        );
        assert!(
            count("_disk0", "errors").unwrap_or(0) > 0,
            "seed {seed:x}: {counters:?}"
        );
        assert!(
            count("_rng", "requests").unwrap_or(0) > 0,
            "seed {seed:x}: {counters:?}"
        );
        eprintln!(
            "seed {seed:x}: {calls} calls, slowest {slowest:?} (vm.info {slowest_info:?}), {counters:?}"
        );
        assert!(
            std::fs::read(&ro).unwrap() == pattern,
            "seed {seed:x}: the read-only disk changed"
        );
        assert_eq!(
            std::fs::metadata(&rw).unwrap().len(),
            1 << 20,
            "seed {seed:x}"
        );
    }
}
