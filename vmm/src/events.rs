//! The event monitor: one JSON object per lifecycle event, one per line, to a file or a file
//! descriptor the caller passed (`--event-monitor path=FILE|fd=N`), as Cloud Hypervisor does:
//!
//! ```json
//! {"timestamp":{"secs":12,"nanos":345},"source":"vm","event":"booted","properties":null}
//! ```
//!
//! The timestamp counts from the monitor's creation (the VMM's start). A failed write is
//! logged once and never stops the VMM.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

/// Where lifecycle events go (cheap to clone; a no-op when there is no sink).
#[derive(Clone, Default)]
pub struct EventMonitor {
    sink: Option<Arc<Sink>>,
}

struct Sink {
    out: Mutex<File>,
    start: Instant,
    failed: AtomicBool,
}

#[derive(Serialize)]
struct Timestamp {
    secs: u64,
    nanos: u32,
}

#[derive(Serialize)]
struct Event<'a> {
    timestamp: Timestamp,
    source: &'a str,
    event: &'a str,
    properties: Option<&'a serde_json::Value>,
}

impl EventMonitor {
    /// A monitor that writes to `out` (a file opened for appending, or a pipe).
    pub fn new(out: File) -> Self {
        EventMonitor {
            sink: Some(Arc::new(Sink {
                out: Mutex::new(out),
                start: Instant::now(),
                failed: AtomicBool::new(false),
            })),
        }
    }

    /// Writes one event line.
    pub fn emit(&self, source: &str, event: &str) {
        self.emit_with(source, event, None);
    }

    /// Writes one event line with its `properties` (e.g. a migration's figures).
    pub fn emit_with(&self, source: &str, event: &str, properties: Option<&serde_json::Value>) {
        tracing::info!("event: {source} {event}");
        let Some(sink) = &self.sink else { return };
        let elapsed = sink.start.elapsed();
        let record = Event {
            timestamp: Timestamp {
                secs: elapsed.as_secs(),
                nanos: elapsed.subsec_nanos(),
            },
            source,
            event,
            properties,
        };
        let Ok(mut line) = serde_json::to_vec(&record) else {
            return;
        };
        line.push(b'\n');
        let result = sink
            .out
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .write_all(&line);
        if let Err(e) = result {
            if !sink.failed.swap(true, Ordering::Relaxed) {
                tracing::warn!("event monitor: {e} (further events are dropped silently)");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_json_object_per_line() {
        let dir = std::env::temp_dir().join(format!("podvisor-events-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("events");
        let monitor = EventMonitor::new(File::create(&path).unwrap());
        monitor.emit("vm", "booting");
        monitor.clone().emit("vm", "booted");
        monitor.emit_with(
            "vm",
            "migration-round",
            Some(&serde_json::json!({"round": 2})),
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let events: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0]["properties"], serde_json::Value::Null);
        assert_eq!(events[2]["properties"]["round"], 2);
        assert_eq!(events[0]["source"], "vm");
        assert_eq!(events[0]["event"], "booting");
        assert_eq!(events[1]["event"], "booted");
        assert!(events[1]["timestamp"]["secs"].is_u64());
        assert!(events[1]["timestamp"]["nanos"].is_u64());
        EventMonitor::default().emit("vm", "ignored");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
