//! The source side of a live migration (see the module docs of [`super`]).

use std::time::{Duration, Instant};

use devices::block::LockMode;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::protocol::{self, Complete, Hello, Kind, MemoryFrame};
use super::{Cancel, Endpoint, MigrationError, Progress, SendOptions, Stream};
use crate::config::VmConfig;
use crate::vm::RunningVm;
use crate::vstate::memory;

const PAGE: usize = 4096;
/// Pages read from guest memory at a time.
const RUN_PAGES: usize = 256;
/// How often the first pass looks at the dirty-page log, to leave what the guest wrote
/// meanwhile to the next round.
const DIRTY_REFRESH: Duration = Duration::from_millis(250);

fn vm_failed(what: &str) -> impl FnOnce(crate::Error) -> MigrationError + '_ {
    move |e| MigrationError::Vm(format!("{what}: {e}"))
}

/// Migrates the running guest of `vm` (built from `config`) to the destination at `endpoint`.
/// `report` hears of every round. On success the guest is paused here and runs at the
/// destination: the caller ends this VM. On failure the guest runs here as before.
/// `cancel` can stop it from another thread until the destination is told to run the guest.
pub fn send(
    vm: &RunningVm,
    config: &VmConfig,
    endpoint: &Endpoint,
    options: &SendOptions,
    cancel: &Cancel,
    report: &mut dyn FnMut(&Progress),
) -> Result<Progress, MigrationError> {
    let stream = endpoint.connect()?;
    cancel.begin(&stream)?;
    // The destination opens the disks too: both ends share their locks until one of them
    // runs the VM.
    let result = vm
        .set_disk_locks(LockMode::Standby)
        .map_err(vm_failed("share the disks' locks"))
        .and_then(|()| send_on(stream, vm, config, options, cancel, report));
    // A cancel shuts the connection down: whatever failed after it failed because of it.
    let result = match result {
        Err(e) if !matches!(e, MigrationError::Unresolved(_)) && cancel.cancelled() => {
            Err(MigrationError::Cancelled)
        }
        other => other,
    };
    cancel.end();
    let unresolved = matches!(result, Err(MigrationError::Unresolved(_)));
    if result.is_err() && !unresolved && vm.is_paused() {
        // The last pass failed: the guest continues here, as if nothing happened.
        if let Err(e) = vm.resume() {
            tracing::error!("migration failed and the guest could not be resumed: {e}");
        }
    }
    if result.is_err() && !unresolved {
        relock_disks(vm);
    }
    result
}

/// Takes the disks' locks back after a failed migration. The destination may hold its
/// shared locks a moment longer (it learns of the failure after this side): a few tries.
fn relock_disks(vm: &RunningVm) {
    let mut tries = 0;
    loop {
        match vm.set_disk_locks(LockMode::Active) {
            Ok(()) => return,
            Err(e) if tries == RELOCK_TRIES => {
                tracing::error!("migration failed and the disks could not be locked again: {e}");
                return;
            }
            Err(_) => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Tries of [`relock_disks`], 100 ms apart.
const RELOCK_TRIES: u32 = 50;

fn send_on(
    mut stream: Stream,
    vm: &RunningVm,
    config: &VmConfig,
    options: &SendOptions,
    cancel: &Cancel,
    report: &mut dyn FnMut(&Progress),
) -> Result<Progress, MigrationError> {
    protocol::write_json(
        &mut stream,
        Kind::Hello,
        &Hello {
            format: protocol::FORMAT.into(),
            version: protocol::VERSION,
            local: options.local,
        },
    )?;
    protocol::read_ack(&mut stream, "HELLO")?;
    protocol::write_json(&mut stream, Kind::Config, config)?;
    if options.local {
        let memfd = memory::memfd_of(vm.memory()).ok_or_else(|| {
            MigrationError::Vm("local: the guest memory has no memfd to hand over".into())
        })?;
        stream.send_file(memfd)?;
    }
    protocol::read_ack(&mut stream, "the configuration")?;
    if !options.local {
        vm.start_dirty_log()
            .map_err(vm_failed("start logging dirty pages"))?;
    }
    let mut sender = Sender {
        vm,
        stream,
        frame: MemoryFrame::default(),
        options,
        cancel,
        started: Instant::now(),
        progress: Progress::default(),
        processed: 0,
        reading: Duration::ZERO,
        sending: Duration::ZERO,
    };
    let result = sender.migrate(report);
    let _ = vm.set_throttle(0);
    let _ = vm.stop_dirty_log();
    result
}

struct Sender<'a> {
    vm: &'a RunningVm,
    stream: Stream,
    frame: MemoryFrame,
    options: &'a SendOptions,
    cancel: &'a Cancel,
    started: Instant,
    progress: Progress,
    /// Guest-memory bytes read and sent (as data or as zeros) so far: what the rate that
    /// predicts the last pass's length counts.
    processed: u64,
    /// Time spent reading guest memory into frames, and checksumming and sending them.
    reading: Duration,
    sending: Duration,
}

impl Sender<'_> {
    fn migrate(&mut self, report: &mut dyn FnMut(&Progress)) -> Result<Progress, MigrationError> {
        if self.options.local {
            // The destination maps this very memory: nothing to copy, only the state.
            return self.switch_over(Vec::new(), report);
        }
        // Round 1: all of memory but its zero pages (the destination's are zero already);
        // what the guest never wrote is not even read.
        let round_start = Instant::now();
        let memory = self.vm.memory();
        let ranges: Vec<(usize, u64, u64)> = memory
            .iter()
            .enumerate()
            .flat_map(|(slot, r)| {
                memory::data_ranges(r)
                    .into_iter()
                    .map(move |(offset, len)| (slot, offset, len))
            })
            .collect();
        let starts: Vec<u64> = memory.iter().map(|r| r.start_addr().0).collect();
        // The destination faults these in while they arrive (see `Prefault` there); a
        // plan is advice, so a very fragmented memory's is cut short rather than too large.
        let plan = protocol::Plan {
            ranges: ranges
                .iter()
                .take(protocol::PLAN_RANGES)
                .map(|&(slot, offset, len)| (starts[slot] + offset, len))
                .collect(),
        };
        protocol::write_json(&mut self.stream, Kind::Plan, &plan)?;
        // Pages the guest writes while this pass goes on are left to the next round, which
        // sends them anyway: a page it keeps rewriting crosses once, not twice. The log is
        // looked at every `DIRTY_REFRESH` (each look makes the guest fault on its next
        // write to every page it had written), first as the pass begins.
        let mut deferred: Vec<Vec<u64>> = memory
            .iter()
            .map(|r| vec![0; (r.len() as usize / PAGE).div_ceil(64)])
            .collect();
        let mut looked: Option<Instant> = None;
        for (slot, offset, len) in ranges {
            let mut at = 0;
            while at < len {
                if looked.is_none_or(|t| t.elapsed() >= DIRTY_REFRESH) {
                    let dirty = self
                        .vm
                        .dirty_pages()
                        .map_err(vm_failed("read the dirty-page log"))?;
                    merge(&mut deferred, &dirty);
                    looked = Some(Instant::now());
                }
                let n = (len - at).min((RUN_PAGES * PAGE) as u64);
                let first = ((offset + at) / PAGE as u64) as usize;
                let pages = (n as usize).div_ceil(PAGE);
                for (page, count) in runs(&deferred[slot], first, first + pages, false) {
                    let gpa = starts[slot] + (page * PAGE) as u64;
                    // The last page of a range may be short.
                    let bytes = (count * PAGE).min((offset + len - (page * PAGE) as u64) as usize);
                    self.send_run(gpa, bytes, true)?;
                }
                at += n;
            }
        }
        let left_over = count(&deferred);
        // The first dirty round sends them.
        let mut deferred = Some(deferred);
        self.flush_frame()?;
        let mut rate = rate_of(self.processed, round_start.elapsed());
        tracing::info!(
            "migration round 1: {} MiB read, {} MiB sent in {} ms ({} ms reading guest memory, \
             {} ms checksumming and sending), {} MiB written meanwhile left to round 2",
            self.processed >> 20,
            self.progress.bytes_sent >> 20,
            round_start.elapsed().as_millis(),
            self.reading.as_millis(),
            self.sending.as_millis(),
            (left_over * PAGE as u64) >> 20
        );
        self.progress.round = 1;
        report(&self.progress);
        // Dirty rounds until the rest fits the downtime limit.
        let mut previous_left = u64::MAX;
        loop {
            let round_start = Instant::now();
            let mut dirty = self
                .vm
                .dirty_pages()
                .map_err(vm_failed("read the dirty-page log"))?;
            if let Some(deferred) = deferred.take() {
                merge(&mut dirty, &deferred);
            }
            let pages = count(&dirty);
            let left = pages * PAGE as u64;
            self.progress.bytes_left = left;
            self.progress.expected_downtime_ms = left * 1000 / rate;
            if self.progress.expected_downtime_ms <= self.options.downtime_limit_ms {
                // What was just read goes in the last pass, with what the guest writes until
                // it is paused.
                return self.switch_over(dirty, report);
            }
            let limit = Duration::from_secs(self.options.completion_timeout_s);
            if self.started.elapsed() > limit {
                return Err(MigrationError::NoConvergence(format!(
                    "memory did not converge within {} s: {} MiB still dirty after {} rounds \
                     ({} pages written per second, {} MiB/s sent, vCPUs throttled {}%), {} ms \
                     expected downtime against a limit of {} ms",
                    self.options.completion_timeout_s,
                    left >> 20,
                    self.progress.round,
                    self.progress.dirty_pages_per_s,
                    rate >> 20,
                    self.progress.throttle_percent,
                    self.progress.expected_downtime_ms,
                    self.options.downtime_limit_ms
                )));
            }
            if self.options.auto_converge {
                self.converge(left, previous_left)?;
            }
            previous_left = left;
            let before = self.processed;
            self.send_dirty(&dirty)?;
            let took = round_start.elapsed();
            rate = rate_of(self.processed - before, took);
            self.progress.round += 1;
            self.progress.dirty_pages_per_s = pages * 1000 / (took.as_millis() as u64).max(1);
            report(&self.progress);
        }
    }

    /// Auto-converge: when a round left at least 90% of what the one before left, the guest
    /// writes about as fast as memory is sent: its vCPUs sleep more (30%, then +15% a round, up
    /// to 99%).
    fn converge(&mut self, left: u64, previous_left: u64) -> Result<(), MigrationError> {
        if previous_left == u64::MAX || left < previous_left / 10 * 9 {
            return Ok(());
        }
        let now = self.progress.throttle_percent;
        let next = if now == 0 { 30 } else { (now + 15).min(99) };
        if next != now {
            self.vm
                .set_throttle(next)
                .map_err(vm_failed("throttle the vCPUs"))?;
            tracing::info!("auto-converge: the vCPUs sleep {next}% of their time");
            self.progress.throttle_percent = next;
        }
        Ok(())
    }

    /// Pauses the guest, sends what it wrote last and its state, and waits until the
    /// destination runs it.
    fn switch_over(
        &mut self,
        mut dirty: Vec<Vec<u64>>,
        report: &mut dyn FnMut(&Progress),
    ) -> Result<Progress, MigrationError> {
        let paused_at = Instant::now();
        // The throttle parks and releases the vCPUs on its own: it ends before the pause.
        self.vm
            .set_throttle(0)
            .map_err(vm_failed("end the throttling"))?;
        self.vm.pause().map_err(vm_failed("pause the guest"))?;
        // A guest that powered off or reset meanwhile is not sent on (its VMM here handles
        // that exit once the migration has given up).
        if let Some(how) = self.vm.pending_exit() {
            return Err(MigrationError::Vm(format!(
                "the guest {how} during the migration"
            )));
        }
        self.vm
            .flush_disks()
            .map_err(vm_failed("flush the disks"))?;
        // Nothing is written here from now on: the destination may take the disks.
        self.vm
            .set_disk_locks(LockMode::Released)
            .map_err(vm_failed("release the disks' locks"))?;
        let flushed_at = Instant::now();
        if !self.options.local {
            let last = self
                .vm
                .dirty_pages()
                .map_err(vm_failed("read the dirty-page log"))?;
            merge(&mut dirty, &last);
            self.send_dirty(&dirty)?;
        }
        let pages_at = Instant::now();
        let state = self.vm.save().map_err(vm_failed("save the machine"))?;
        protocol::write_json(&mut self.stream, Kind::State, &state)?;
        protocol::read_ack(&mut self.stream, "the machine state")?;
        let state_at = Instant::now();
        self.cancel.commit()?;
        protocol::write_json(&mut self.stream, Kind::Complete, &Complete { resume: true })?;
        // From here on the destination may run the guest: only its refusal (an ERROR frame)
        // gives the guest back to this side; silence leaves it paused (see `Unresolved`).
        match protocol::read_ack(&mut self.stream, "COMPLETE") {
            Ok(()) => {}
            Err(e @ MigrationError::Peer(_)) => return Err(e),
            Err(e) => return Err(MigrationError::Unresolved(e.to_string())),
        }
        let ms = |from: Instant, to: Instant| to.duration_since(from).as_millis();
        tracing::info!(
            "migration switch-over: pause and flush {} ms, last pages {} ms, state {} ms, \
             destination running {} ms",
            ms(paused_at, flushed_at),
            ms(flushed_at, pages_at),
            ms(pages_at, state_at),
            ms(state_at, Instant::now())
        );
        self.progress.round += 1;
        self.progress.bytes_left = 0;
        self.progress.downtime_ms = Some(paused_at.elapsed().as_millis() as u64);
        self.progress.total_ms = Some(self.started.elapsed().as_millis() as u64);
        report(&self.progress);
        Ok(self.progress.clone())
    }

    /// Sends the pages set in `dirty` (per region, one bit per page), zero pages as zeros.
    fn send_dirty(&mut self, dirty: &[Vec<u64>]) -> Result<(), MigrationError> {
        let starts: Vec<u64> = self.vm.memory().iter().map(|r| r.start_addr().0).collect();
        for (start, words) in starts.into_iter().zip(dirty) {
            for (page, count) in runs(words, 0, words.len() * 64, true) {
                self.send_run(start + (page * PAGE) as u64, count * PAGE, false)?;
            }
        }
        self.flush_frame()
    }

    /// Reads `len` bytes of guest memory at `gpa` straight into the frame: zero pages are
    /// skipped (`skip_zeros`, the first pass) or sent as zeros.
    fn send_run(&mut self, gpa: u64, len: usize, skip_zeros: bool) -> Result<(), MigrationError> {
        if !self.frame.has_room(len) {
            self.flush_frame()?;
        }
        let memory = self.vm.memory();
        let at = Instant::now();
        let added = self.frame.add_memory(gpa, len, skip_zeros, |buf| {
            memory
                .read_slice(buf, GuestAddress(gpa))
                .map_err(|e| MigrationError::Vm(format!("read guest memory at {gpa:#x}: {e}")))
        })?;
        self.reading += at.elapsed();
        self.progress.bytes_sent += added.data;
        self.processed += len as u64;
        Ok(())
    }

    fn flush_frame(&mut self) -> Result<(), MigrationError> {
        if self.frame.is_empty() {
            return Ok(());
        }
        let at = Instant::now();
        protocol::write_frame(&mut self.stream, Kind::Memory, self.frame.payload())?;
        self.sending += at.elapsed();
        self.frame.clear();
        if let Some(limit) = self.options.bandwidth_limit.filter(|&l| l > 0) {
            // Stay under the limit on average since the start.
            let due = Duration::from_secs_f64(self.progress.bytes_sent as f64 / limit as f64);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(())
    }
}

fn bit(words: &[u64], page: usize) -> bool {
    words[page / 64] & (1 << (page % 64)) != 0
}

/// The runs of pages in `[from, to)` whose bit in `words` is `set`, as (first page, pages),
/// each at most [`RUN_PAGES`] long.
fn runs(words: &[u64], from: usize, to: usize, set: bool) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut page = from;
    while page < to {
        if bit(words, page) != set {
            page += 1;
            continue;
        }
        let mut end = page + 1;
        while end < to && end - page < RUN_PAGES && bit(words, end) == set {
            end += 1;
        }
        runs.push((page, end - page));
        page = end;
    }
    runs
}

/// Adds the pages set in `more` to `into` (both per region, one bit per page).
fn merge(into: &mut [Vec<u64>], more: &[Vec<u64>]) {
    for (words, more) in into.iter_mut().zip(more) {
        for (w, m) in words.iter_mut().zip(more) {
            *w |= m;
        }
    }
}

fn count(dirty: &[Vec<u64>]) -> u64 {
    dirty
        .iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

/// Bytes per second (at least 1 MiB/s, so that a tiny first pass does not make every later
/// estimate huge).
fn rate_of(bytes: u64, took: Duration) -> u64 {
    let ms = (took.as_millis() as u64).max(1);
    (bytes * 1000 / ms).max(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_pages_split_at_the_other_kind_and_at_run_pages() {
        // Pages 3-5 and 70 set, in a 3-word map.
        let words = vec![0b11_1000, 1 << 6, 0];
        assert_eq!(runs(&words, 0, 192, true), vec![(3, 3), (70, 1)]);
        assert_eq!(
            runs(&words, 0, 80, false),
            vec![(0, 3), (6, 64), (71, 9)],
            "clear runs, each cut where a set page is"
        );
        assert_eq!(
            runs(&words, 4, 5, true),
            vec![(4, 1)],
            "within [from, to) only"
        );
        let all = vec![u64::MAX; 8];
        assert_eq!(
            runs(&all, 0, 512, true),
            vec![(0, RUN_PAGES), (RUN_PAGES, RUN_PAGES)]
        );
        assert!(runs(&all, 0, 512, false).is_empty());
    }

    #[test]
    fn merge_adds_pages() {
        let mut into = vec![vec![0b01, 0], vec![0]];
        merge(&mut into, &[vec![0b10, 4], vec![8]]);
        assert_eq!(into, vec![vec![0b11, 4], vec![8]]);
    }
}
