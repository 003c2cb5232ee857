//! Prints a metrics page (`GET /metrics`) of a VM with a disk, a network interface and a
//! migration under way, from the fake VMM's state: resources/k8s/check.sh feeds it to
//! `promtool check metrics`.

use api::metrics::{render, ProcessStats};
use api::{VmCounters, VmInfo};

fn main() {
    let info: VmInfo = serde_json::from_value(serde_json::json!({
        "config": {"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 2},
                   "memory": {"size": 1073741824u64}},
        "state": "Running",
        "migration": {"state": "Sending", "round": 3, "bytes_sent": 734003200u64,
                      "bytes_left": 52428800u64, "dirty_pages_per_s": 2000,
                      "expected_downtime_ms": 120, "throttle_percent": 0},
    }))
    .expect("a VmInfo");
    let counters: VmCounters = serde_json::from_value(serde_json::json!({
        "root": {"read_bytes": 1, "write_bytes": 2, "read_ops": 3, "write_ops": 4,
                 "flushes": 5, "discards": 6, "write_zeroes": 7, "errors": 0,
                 "read_ns": 8_000_000, "write_ns": 9_000_000, "flush_ns": 10_000_000},
        "_net0": {"rx_bytes": 1, "tx_bytes": 2, "rx_frames": 3, "tx_frames": 4,
                  "rx_drops": 0, "tx_drops": 0, "rx_errors": 0, "tx_errors": 0},
    }))
    .expect("counters");
    let process = ProcessStats {
        vcpu_seconds: vec![(0, 12.5), (1, 3.25)],
        resident_bytes: 300 << 20,
    };
    print!("{}", render(Some(&info), &counters, &process));
}
