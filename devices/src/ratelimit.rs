//! Rate limits for log lines a guest can trigger at will (a driver resetting its device in
//! a loop, a queue it breaks again and again, output that cannot be written): at the
//! default level such lines must not become a flood that fills the node's disk or drowns
//! the lines that matter. [`warn_limited!`](crate::warn_limited) logs at most
//! [`BURST`] lines per call site in each [`WINDOW_MS`] window, then one line that says how
//! many it left out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Lines a call site may log per window.
pub const BURST: u64 = 10;
/// The window, in milliseconds.
pub const WINDOW_MS: u64 = 10_000;

/// The state of one call site: its window's start and how many lines it logged (or left
/// out) in it.
#[derive(Debug, Default)]
pub struct LogLimit {
    /// Window start, in ms since the process's first limited line, plus one (0: never).
    window: AtomicU64,
    logged: AtomicU64,
    dropped: AtomicU64,
}

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

impl LogLimit {
    pub const fn new() -> Self {
        LogLimit {
            window: AtomicU64::new(0),
            logged: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
        }
    }

    /// Whether a line may be logged now: `Some(n)` with the number of lines left out before
    /// it (to say so), `None` to leave it out.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(now_ms())
    }

    fn allow_at(&self, now: u64) -> Option<u64> {
        let start = self.window.load(Ordering::Relaxed);
        if start == 0 || now.saturating_sub(start) >= WINDOW_MS {
            // A new window (racing callers may both start one: a line or two more at most).
            self.window.store(now, Ordering::Relaxed);
            self.logged.store(1, Ordering::Relaxed);
            return Some(self.dropped.swap(0, Ordering::Relaxed));
        }
        if self.logged.fetch_add(1, Ordering::Relaxed) < BURST {
            return Some(0);
        }
        self.dropped.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// `tracing::warn!` for lines a guest can trigger: at most [`BURST`] per call site in each
/// window of [`WINDOW_MS`].
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::LogLimit = $crate::ratelimit::LogLimit::new();
        if let Some(dropped) = LIMIT.allow() {
            if dropped > 0 {
                $crate::tracing::warn!("({dropped} more like the next line were left out)");
            }
            $crate::tracing::warn!($($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_silence_then_a_count() {
        let limit = LogLimit::new();
        let logged = (0..1000).filter(|_| limit.allow_at(5).is_some()).count();
        assert_eq!(logged as u64, BURST);
        // Still the same window.
        assert_eq!(limit.allow_at(5 + WINDOW_MS - 1), None);
        // The next window says how many were left out.
        assert_eq!(limit.allow_at(5 + WINDOW_MS), Some(1000 - BURST + 1));
        assert_eq!(limit.allow_at(5 + WINDOW_MS), Some(0));
    }

    /// Counts the events logged.
    struct Count(std::sync::Arc<AtomicU64>);

    impl tracing::Subscriber for Count {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, _: &tracing::Event<'_>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    /// Issue 15, item 7: a guest that triggers a warning in a loop gets a burst of lines,
    /// not one per trigger.
    #[test]
    fn a_flood_from_one_call_site_is_a_burst() {
        let events = std::sync::Arc::new(AtomicU64::new(0));
        tracing::subscriber::with_default(Count(events.clone()), || {
            for i in 0..100_000 {
                crate::warn_limited!("virtio-blk: queue 0 disabled until reset: round {i}");
            }
        });
        assert_eq!(events.load(Ordering::Relaxed), BURST);
    }
}
