//! MSI-X: the capability, the vector table and the pending-bit array a function exposes in a
//! BAR, and the masking rules that decide whether a vector is delivered or left pending.
//!
//! The table lives with the device (behind its lock, reached from vCPU threads); delivery goes
//! through [`MsixVectors`], shared with the device's worker threads, whose hot path is one
//! atomic load and [`MsiIrqs::trigger`] (an eventfd write when the VMM backs it with KVM irqfds).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::{Persist, PersistError};

/// PCI capability ID of MSI-X.
pub const MSIX_CAPABILITY_ID: u8 = 0x11;
/// Bytes per MSI-X table entry.
pub const MSIX_ENTRY_SIZE: u64 = 16;
/// The largest table the capability can describe.
pub const MSIX_MAX_VECTORS: u16 = 2048;

const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_CONTROL_MASKED: u32 = 1;

/// The address and data of one MSI.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// Where MSI-X vectors go: implemented by the VMM (a KVM GSI route plus an irqfd per vector).
pub trait MsiIrqs: Send + Sync {
    /// Vector `vector` now sends `msg`; `masked` is true when it must not fire (entry masked,
    /// function masked or MSI-X disabled). Called from vCPU threads on table and control
    /// writes, never on the interrupt hot path. `trigger` is never called for a masked vector
    /// (the table keeps it pending instead), so a VMM may keep a masked vector's irqfd and
    /// route as they are; every change to a vector's message reaches `update` before the
    /// vector can fire with it.
    fn update(&self, vector: u16, msg: MsiMessage, masked: bool);
    /// Delivers vector `vector` with the message last given to `update` (hot path: must not
    /// block; e.g. an eventfd write).
    fn trigger(&self, vector: u16);
}

/// The MSI-X capability's body (after the ID and next pointer) for a table of `vectors`
/// entries at `table_offset` in BAR `table_bar` and a PBA at `pba_offset` in BAR `pba_bar`,
/// and the mask of the bits the guest may write (Enable and Function Mask).
pub fn msix_capability(
    vectors: u16,
    table_bar: u8,
    table_offset: u32,
    pba_bar: u8,
    pba_offset: u32,
) -> ([u8; 10], [u8; 10]) {
    let mut body = [0u8; 10];
    let control = vectors.clamp(1, MSIX_MAX_VECTORS) - 1;
    body[0..2].copy_from_slice(&control.to_le_bytes());
    body[2..6].copy_from_slice(&(table_offset & !7 | u32::from(table_bar & 7)).to_le_bytes());
    body[6..10].copy_from_slice(&(pba_offset & !7 | u32::from(pba_bar & 7)).to_le_bytes());
    let mut writable = [0u8; 10];
    writable[1] = ((CONTROL_ENABLE | CONTROL_FUNCTION_MASK) >> 8) as u8;
    (body, writable)
}

/// Size in bytes of the pending-bit array of `vectors` vectors.
pub fn pba_size(vectors: u16) -> u64 {
    u64::from(vectors).div_ceil(64) * 8
}

/// The delivery side of an MSI-X table, shared with the threads that raise interrupts.
pub struct MsixVectors {
    irqs: Arc<dyn MsiIrqs>,
    enabled: AtomicBool,
    function_masked: AtomicBool,
    entry_masked: Vec<AtomicBool>,
    pending: Vec<AtomicU64>,
}

impl MsixVectors {
    /// Number of vectors.
    pub fn len(&self) -> u16 {
        self.entry_masked.len() as u16
    }

    /// Whether the table has no vectors.
    pub fn is_empty(&self) -> bool {
        self.entry_masked.is_empty()
    }

    /// Whether the guest enabled MSI-X.
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    fn masked(&self, vector: usize) -> bool {
        self.function_masked.load(Ordering::SeqCst)
            || self.entry_masked[vector].load(Ordering::SeqCst)
    }

    fn set_pending(&self, vector: usize) {
        self.pending[vector / 64].fetch_or(1 << (vector % 64), Ordering::SeqCst);
    }

    /// Clears the pending bit; true if it was set.
    fn take_pending(&self, vector: usize) -> bool {
        let bit = 1 << (vector % 64);
        self.pending[vector / 64].fetch_and(!bit, Ordering::SeqCst) & bit != 0
    }

    /// Raises `vector`: delivered now, or left pending while masked. Returns false when MSI-X is
    /// disabled (the caller may fall back to INTx) and true otherwise, including for vectors
    /// beyond the table, which are dropped.
    pub fn trigger(&self, vector: u16) -> bool {
        if !self.enabled() {
            return false;
        }
        let v = usize::from(vector);
        if v >= self.entry_masked.len() {
            return true;
        }
        if !self.masked(v) {
            self.irqs.trigger(vector);
            return true;
        }
        self.set_pending(v);
        // An unmask racing with us may have looked at the pending bit before we set it: if the
        // vector is unmasked now, whoever clears the bit delivers it.
        if !self.masked(v) && self.take_pending(v) {
            self.irqs.trigger(vector);
        }
        true
    }

    /// Delivers `vector` if it is pending and no longer masked (after an unmask).
    fn deliver_pending(&self, v: usize) {
        if self.enabled() && !self.masked(v) && self.take_pending(v) {
            self.irqs.trigger(v as u16);
        }
    }
}

/// One MSI-X table entry as the guest programmed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntry {
    pub address_low: u32,
    pub address_high: u32,
    pub data: u32,
    pub vector_control: u32,
}

impl Default for MsixEntry {
    fn default() -> Self {
        MsixEntry {
            address_low: 0,
            address_high: 0,
            data: 0,
            vector_control: VECTOR_CONTROL_MASKED,
        }
    }
}

impl MsixEntry {
    fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..4].copy_from_slice(&self.address_low.to_le_bytes());
        b[4..8].copy_from_slice(&self.address_high.to_le_bytes());
        b[8..12].copy_from_slice(&self.data.to_le_bytes());
        b[12..16].copy_from_slice(&self.vector_control.to_le_bytes());
        b
    }

    fn from_bytes(b: &[u8; 16]) -> Self {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        MsixEntry {
            address_low: word(0),
            address_high: word(4),
            data: word(8),
            // Only the mask bit of vector control is defined.
            vector_control: word(12) & VECTOR_CONTROL_MASKED,
        }
    }

    fn message(&self) -> MsiMessage {
        MsiMessage {
            address: u64::from(self.address_high) << 32 | u64::from(self.address_low),
            data: self.data,
        }
    }

    fn masked(&self) -> bool {
        self.vector_control & VECTOR_CONTROL_MASKED != 0
    }
}

/// Saved MSI-X state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    pub entries: Vec<MsixEntry>,
    pub pending: Vec<u64>,
    pub enabled: bool,
    pub function_masked: bool,
}

/// An MSI-X table and PBA.
pub struct MsixTable {
    entries: Vec<MsixEntry>,
    vectors: Arc<MsixVectors>,
}

impl MsixTable {
    /// A table of `vectors` entries (clamped to 1..=2048), all masked, MSI-X disabled.
    pub fn new(vectors: u16, irqs: Arc<dyn MsiIrqs>) -> Self {
        let n = usize::from(vectors.clamp(1, MSIX_MAX_VECTORS));
        MsixTable {
            entries: vec![MsixEntry::default(); n],
            vectors: Arc::new(MsixVectors {
                irqs,
                enabled: AtomicBool::new(false),
                function_masked: AtomicBool::new(false),
                entry_masked: (0..n).map(|_| AtomicBool::new(true)).collect(),
                pending: (0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            }),
        }
    }

    /// The delivery side, for the threads that raise interrupts.
    pub fn vectors(&self) -> Arc<MsixVectors> {
        self.vectors.clone()
    }

    /// Number of vectors.
    pub fn len(&self) -> u16 {
        self.entries.len() as u16
    }

    /// Whether the table has no vectors (never: a table has at least one).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Size in bytes of the table region.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * MSIX_ENTRY_SIZE
    }

    /// A guest read in the table region.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let o = offset.saturating_add(i as u64);
            *b = match self.entries.get((o / MSIX_ENTRY_SIZE) as usize) {
                Some(e) => e.to_bytes()[(o % MSIX_ENTRY_SIZE) as usize],
                None => 0,
            };
        }
    }

    /// A guest write in the table region.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let mut i = 0;
        while i < data.len() {
            let o = offset.saturating_add(i as u64);
            let index = (o / MSIX_ENTRY_SIZE) as usize;
            let start = (o % MSIX_ENTRY_SIZE) as usize;
            let n = (16 - start).min(data.len() - i);
            let Some(entry) = self.entries.get(index).copied() else {
                return;
            };
            let mut bytes = entry.to_bytes();
            bytes[start..start + n].copy_from_slice(&data[i..i + n]);
            let new = MsixEntry::from_bytes(&bytes);
            if new != entry {
                self.entries[index] = new;
                self.vectors.entry_masked[index].store(new.masked(), Ordering::SeqCst);
                // Drivers rewrite an entry field by field while it is masked: the VMM hears
                // of it when the mask changes, or when a live vector's message changes.
                let live = self.vectors.enabled() && !self.vectors.masked(index);
                if entry.masked() != new.masked() || (live && entry.message() != new.message()) {
                    self.notify_update(index);
                }
                if entry.masked() && !new.masked() {
                    self.vectors.deliver_pending(index);
                }
            }
            i += n;
        }
    }

    /// A guest read in the PBA region.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let o = offset.saturating_add(i as u64);
            *b = match self.vectors.pending.get((o / 8) as usize) {
                Some(w) => (w.load(Ordering::SeqCst) >> (8 * (o % 8))) as u8,
                None => 0,
            };
        }
    }

    /// The guest wrote the capability's Message Control register.
    pub fn set_message_control(&mut self, control: u16) {
        let enabled = control & CONTROL_ENABLE != 0;
        let function_masked = control & CONTROL_FUNCTION_MASK != 0;
        let v = &self.vectors;
        let was_enabled = v.enabled.swap(enabled, Ordering::SeqCst);
        let was_masked = v.function_masked.swap(function_masked, Ordering::SeqCst);
        if was_enabled == enabled && was_masked == function_masked {
            return;
        }
        for index in 0..self.entries.len() {
            self.notify_update(index);
            self.vectors.deliver_pending(index);
        }
    }

    fn notify_update(&self, index: usize) {
        let v = &self.vectors;
        let masked = !v.enabled() || v.masked(index);
        v.irqs
            .update(index as u16, self.entries[index].message(), masked);
    }
}

impl Persist for MsixTable {
    const NAME: &'static str = "MSI-X table";
    type State = MsixState;

    fn save(&self) -> MsixState {
        MsixState {
            entries: self.entries.clone(),
            pending: self
                .vectors
                .pending
                .iter()
                .map(|w| w.load(Ordering::SeqCst))
                .collect(),
            enabled: self.vectors.enabled(),
            function_masked: self.vectors.function_masked.load(Ordering::SeqCst),
        }
    }

    fn restore(&mut self, state: &MsixState) -> Result<(), PersistError> {
        let v = &self.vectors;
        if state.entries.len() != self.entries.len() || state.pending.len() != v.pending.len() {
            return Err(PersistError::mismatch(
                Self::NAME,
                format!(
                    "{} entries ({} pending words) saved, the table has {} ({})",
                    state.entries.len(),
                    state.pending.len(),
                    self.entries.len(),
                    v.pending.len()
                ),
            ));
        }
        for (i, (e, saved)) in self.entries.iter_mut().zip(&state.entries).enumerate() {
            *e = *saved;
            e.vector_control &= VECTOR_CONTROL_MASKED;
            v.entry_masked[i].store(e.masked(), Ordering::SeqCst);
        }
        for (w, saved) in v.pending.iter().zip(&state.pending) {
            w.store(*saved, Ordering::SeqCst);
        }
        v.enabled.store(state.enabled, Ordering::SeqCst);
        v.function_masked
            .store(state.function_masked, Ordering::SeqCst);
        for index in 0..self.entries.len() {
            self.notify_update(index);
        }
        Ok(())
    }
}

/// Test doubles, built only for the tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::collections::BTreeMap;
    use std::sync::{Condvar, Mutex};
    use std::time::{Duration, Instant};

    use super::{MsiIrqs, MsiMessage};

    /// A recording [`MsiIrqs`] for tests: remembers routes and counts deliveries.
    #[derive(Default)]
    pub struct FakeMsiIrqs {
        routes: Mutex<BTreeMap<u16, (MsiMessage, bool)>>,
        fired: Mutex<BTreeMap<u16, u64>>,
        cond: Condvar,
    }

    impl FakeMsiIrqs {
        /// The last `update` for `vector`.
        pub fn route(&self, vector: u16) -> Option<(MsiMessage, bool)> {
            self.routes.lock().unwrap().get(&vector).copied()
        }

        /// How many times `vector` was triggered.
        pub fn count(&self, vector: u16) -> u64 {
            self.fired
                .lock()
                .unwrap()
                .get(&vector)
                .copied()
                .unwrap_or(0)
        }

        /// Waits until `vector` has been triggered at least `count` times; false on timeout.
        pub fn wait_for(&self, vector: u16, count: u64, timeout: Duration) -> bool {
            let deadline = Instant::now() + timeout;
            let mut fired = self.fired.lock().unwrap();
            loop {
                if fired.get(&vector).copied().unwrap_or(0) >= count {
                    return true;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return false;
                }
                fired = self.cond.wait_timeout(fired, left).unwrap().0;
            }
        }
    }

    impl MsiIrqs for FakeMsiIrqs {
        fn update(&self, vector: u16, msg: MsiMessage, masked: bool) {
            self.routes.lock().unwrap().insert(vector, (msg, masked));
        }

        fn trigger(&self, vector: u16) {
            *self.fired.lock().unwrap().entry(vector).or_default() += 1;
            self.cond.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::FakeMsiIrqs;
    use super::*;

    fn table(n: u16) -> (MsixTable, Arc<FakeMsiIrqs>) {
        let irqs = Arc::new(FakeMsiIrqs::default());
        (MsixTable::new(n, irqs.clone()), irqs)
    }

    fn program(t: &mut MsixTable, v: u16, addr: u64, data: u32, masked: bool) {
        let off = u64::from(v) * 16;
        t.write_table(off, &(addr as u32).to_le_bytes());
        t.write_table(off + 4, &((addr >> 32) as u32).to_le_bytes());
        t.write_table(off + 8, &data.to_le_bytes());
        t.write_table(off + 12, &u32::from(masked).to_le_bytes());
    }

    fn pba(t: &MsixTable) -> u64 {
        let mut b = [0u8; 8];
        t.read_pba(0, &mut b);
        u64::from_le_bytes(b)
    }

    #[test]
    fn capability_layout() {
        let (body, writable) = msix_capability(3, 0, 0x4000, 0, 0x6000);
        assert_eq!(&body[0..2], &[2, 0]);
        assert_eq!(u32::from_le_bytes(body[2..6].try_into().unwrap()), 0x4000);
        assert_eq!(u32::from_le_bytes(body[6..10].try_into().unwrap()), 0x6000);
        assert_eq!(writable[1], 0xc0);
        assert_eq!(pba_size(1), 8);
        assert_eq!(pba_size(65), 16);
    }

    #[test]
    fn entries_start_masked_and_read_back() {
        let (mut t, irqs) = table(2);
        let mut b = [0u8; 16];
        t.read_table(16, &mut b);
        assert_eq!(&b[12..16], &[1, 0, 0, 0]);
        program(&mut t, 1, 0xfee0_1000, 0x4041, false);
        t.read_table(16, &mut b);
        assert_eq!(u32::from_le_bytes(b[0..4].try_into().unwrap()), 0xfee0_1000);
        assert_eq!(u32::from_le_bytes(b[8..12].try_into().unwrap()), 0x4041);
        // 8-byte access to the address, reserved vector-control bits read as zero.
        t.write_table(16, &0x1_fee0_2000u64.to_le_bytes());
        t.write_table(28, &0xffff_fffeu32.to_le_bytes());
        let mut q = [0u8; 8];
        t.read_table(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1_fee0_2000);
        t.read_table(28, &mut q[..4]);
        assert_eq!(&q[..4], &[0, 0, 0, 0]);
        // MSI-X is still disabled: the VMM is told the vector is masked, and learns the
        // message once MSI-X is enabled.
        assert!(irqs.route(1).unwrap().1);
        t.set_message_control(CONTROL_ENABLE);
        let (msg, masked) = irqs.route(1).unwrap();
        assert_eq!(msg.address, 0x1_fee0_2000);
        assert!(!masked);
        // A live vector's new message is passed on at once.
        t.write_table(24, &0x55u32.to_le_bytes());
        assert_eq!(irqs.route(1).unwrap().0.data, 0x55);
        // Out of range and odd accesses neither panic nor change anything.
        t.write_table(u64::MAX - 2, &[1, 2, 3, 4]);
        t.read_table(u64::MAX, &mut b);
        t.read_pba(u64::MAX, &mut b);
        t.write_table(30, &[0; 7]);
    }

    #[test]
    fn masked_vectors_pend_and_fire_on_unmask() {
        let (mut t, irqs) = table(3);
        let v = t.vectors();
        assert!(!v.trigger(0), "disabled: caller falls back to INTx");
        t.set_message_control(CONTROL_ENABLE);
        program(&mut t, 0, 0xfee0_0000, 0x30, false);
        program(&mut t, 2, 0xfee0_0000, 0x32, true);
        assert!(v.trigger(0));
        assert_eq!(irqs.count(0), 1);
        assert!(!irqs.route(0).unwrap().1);

        assert!(v.trigger(2));
        assert_eq!(irqs.count(2), 0);
        assert_eq!(pba(&t), 0b100);
        // Unmasking delivers the pending vector once and clears its bit.
        t.write_table(2 * 16 + 12, &0u32.to_le_bytes());
        assert_eq!(irqs.count(2), 1);
        assert_eq!(pba(&t), 0);
        assert!(!irqs.route(2).unwrap().1);
        // A vector beyond the table is dropped.
        assert!(v.trigger(100));
    }

    #[test]
    fn function_mask_holds_all_vectors() {
        let (mut t, irqs) = table(2);
        let v = t.vectors();
        program(&mut t, 0, 0xfee0_0000, 0x30, false);
        program(&mut t, 1, 0xfee0_0000, 0x31, false);
        t.set_message_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        assert!(irqs.route(0).unwrap().1, "function mask reported as masked");
        v.trigger(0);
        v.trigger(1);
        v.trigger(1);
        assert_eq!(irqs.count(0) + irqs.count(1), 0);
        assert_eq!(pba(&t), 0b11);
        // Mask vector 1 individually, then lift the function mask: only 0 fires.
        t.write_table(16 + 12, &1u32.to_le_bytes());
        t.set_message_control(CONTROL_ENABLE);
        assert_eq!((irqs.count(0), irqs.count(1)), (1, 0));
        assert_eq!(pba(&t), 0b10);
        t.write_table(16 + 12, &0u32.to_le_bytes());
        assert_eq!(irqs.count(1), 1, "pending collapses to one delivery");
        assert_eq!(pba(&t), 0);
    }

    #[test]
    fn concurrent_trigger_and_unmask_never_lose_an_interrupt() {
        for _ in 0..200 {
            let (mut t, irqs) = table(1);
            t.set_message_control(CONTROL_ENABLE);
            program(&mut t, 0, 0xfee0_0000, 0x30, true);
            let v = t.vectors();
            let th = std::thread::spawn(move || v.trigger(0));
            t.write_table(12, &0u32.to_le_bytes());
            th.join().unwrap();
            assert_eq!(irqs.count(0), 1);
            assert_eq!(pba(&t), 0);
        }
    }

    #[test]
    fn save_restore() {
        let (mut t, _) = table(2);
        t.set_message_control(CONTROL_ENABLE | CONTROL_FUNCTION_MASK);
        program(&mut t, 1, 0xfee0_0000, 0x31, false);
        t.vectors().trigger(1);
        let state = t.save();
        let (mut u, irqs) = table(2);
        u.restore(&state).unwrap();
        assert_eq!(u.save(), state);
        assert_eq!(
            irqs.route(1).unwrap(),
            (
                MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x31
                },
                true
            )
        );
        u.set_message_control(CONTROL_ENABLE);
        assert_eq!(irqs.count(1), 1);
    }
}
