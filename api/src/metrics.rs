//! `GET /metrics` (also `/api/v1/vmm.metrics`): the VM's state and counters in Prometheus'
//! text format (version 0.0.4), named as KubeVirt names its VMI metrics (`kubevirt_vmi_*`), so
//! that a node agent scraping the VMM's socket exports what KubeVirt users chart already.

use std::fmt::Write;

use crate::types::{VmCounters, VmInfo};

/// What the VMM process itself measures (not in `vm.info`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessStats {
    /// CPU seconds of each vCPU thread (user and system), by vCPU index.
    pub vcpu_seconds: Vec<(u32, f64)>,
    /// The VMM's resident memory (guest memory it has touched included).
    pub resident_bytes: u64,
}

/// One metric family: its name, type and help, then its samples.
struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        let _ = write!(self.out, "{name}");
        if !labels.is_empty() {
            let inner: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = write!(self.out, "{{{}}}", inner.join(","));
        }
        let _ = writeln!(self.out, " {value}");
    }
}

fn family<'a>(out: &'a mut String, name: &str, kind: &str, help: &str) -> Family<'a> {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    Family { out }
}

/// A label value as the text format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A device counter as the VMM keeps it → its metric's name and help, and the counter's unit.
type Counter = (&'static str, &'static str, &'static str, Unit);

/// How a counter's value becomes a sample.
#[derive(Clone, Copy)]
enum Unit {
    /// As it is (bytes, requests, packets).
    Count,
    /// Nanoseconds, shown as seconds.
    Nanos,
}

impl Unit {
    fn show(self, value: u64) -> String {
        match self {
            Unit::Count => value.to_string(),
            Unit::Nanos => format!("{:.9}", value as f64 / 1e9),
        }
    }
}

/// Disk counters (virtio-blk) → metric name, help, unit.
const DISK: &[Counter] = &[
    (
        "read_bytes",
        "kubevirt_vmi_storage_read_traffic_bytes_total",
        "Bytes the guest read from the disk.",
        Unit::Count,
    ),
    (
        "write_bytes",
        "kubevirt_vmi_storage_write_traffic_bytes_total",
        "Bytes the guest wrote to the disk.",
        Unit::Count,
    ),
    (
        "read_ops",
        "kubevirt_vmi_storage_iops_read_total",
        "Read requests the guest made of the disk.",
        Unit::Count,
    ),
    (
        "write_ops",
        "kubevirt_vmi_storage_iops_write_total",
        "Write requests the guest made of the disk.",
        Unit::Count,
    ),
    (
        "flushes",
        "kubevirt_vmi_storage_flush_requests_total",
        "Flush requests the guest made of the disk.",
        Unit::Count,
    ),
    (
        "errors",
        "kubevirt_vmi_storage_errors_total",
        "Disk requests that failed.",
        Unit::Count,
    ),
    (
        "read_ns",
        "kubevirt_vmi_storage_read_times_seconds_total",
        "Time the disk's successful reads took, from the device taking each to its completion.",
        Unit::Nanos,
    ),
    (
        "write_ns",
        "kubevirt_vmi_storage_write_times_seconds_total",
        "Time the disk's successful writes took, from the device taking each to its completion.",
        Unit::Nanos,
    ),
    (
        "flush_ns",
        "kubevirt_vmi_storage_flush_times_seconds_total",
        "Time the disk's successful flushes took, from the device taking each to its completion.",
        Unit::Nanos,
    ),
];

/// Network counters (virtio-net) → metric name, help.
const NET: &[Counter] = &[
    (
        "rx_bytes",
        "kubevirt_vmi_network_receive_bytes_total",
        "Bytes the interface received.",
        Unit::Count,
    ),
    (
        "tx_bytes",
        "kubevirt_vmi_network_transmit_bytes_total",
        "Bytes the interface sent.",
        Unit::Count,
    ),
    (
        "rx_frames",
        "kubevirt_vmi_network_receive_packets_total",
        "Frames the interface received.",
        Unit::Count,
    ),
    (
        "tx_frames",
        "kubevirt_vmi_network_transmit_packets_total",
        "Frames the interface sent.",
        Unit::Count,
    ),
    (
        "rx_drops",
        "kubevirt_vmi_network_receive_packets_dropped_total",
        "Received frames dropped.",
        Unit::Count,
    ),
    (
        "tx_drops",
        "kubevirt_vmi_network_transmit_packets_dropped_total",
        "Frames to send that were dropped.",
        Unit::Count,
    ),
    (
        "rx_errors",
        "kubevirt_vmi_network_receive_errors_total",
        "Receive errors.",
        Unit::Count,
    ),
    (
        "tx_errors",
        "kubevirt_vmi_network_transmit_errors_total",
        "Transmit errors.",
        Unit::Count,
    ),
];

/// The metrics page. `info` is None when the VMM has no VM.
pub fn render(info: Option<&VmInfo>, counters: &VmCounters, process: &ProcessStats) -> String {
    let mut out = String::new();
    let state = info.map_or("None".to_owned(), |i| format!("{:?}", i.state));
    family(
        &mut out,
        "kubevirt_vmi_state",
        "gauge",
        "1 for the state the VM is in.",
    )
    .sample("kubevirt_vmi_state", &[("state", &state)], 1);
    if let Some(info) = info {
        family(
            &mut out,
            "kubevirt_vmi_memory_domain_bytes",
            "gauge",
            "The guest's memory size.",
        )
        .sample(
            "kubevirt_vmi_memory_domain_bytes",
            &[],
            info.config.memory.size,
        );
        family(&mut out, "kubevirt_vmi_vcpus", "gauge", "The VM's vCPUs.").sample(
            "kubevirt_vmi_vcpus",
            &[],
            info.config.cpus.boot_vcpus,
        );
    }
    family(
        &mut out,
        "kubevirt_vmi_memory_resident_bytes",
        "gauge",
        "Resident memory of the VMM process, guest memory it has touched included.",
    )
    .sample(
        "kubevirt_vmi_memory_resident_bytes",
        &[],
        process.resident_bytes,
    );
    if !process.vcpu_seconds.is_empty() {
        let mut f = family(
            &mut out,
            "kubevirt_vmi_vcpu_seconds_total",
            "counter",
            "CPU time each vCPU thread used, in the guest and in the VMM.",
        );
        for (id, seconds) in &process.vcpu_seconds {
            f.sample(
                "kubevirt_vmi_vcpu_seconds_total",
                &[("id", &id.to_string())],
                format!("{seconds:.3}"),
            );
        }
    }
    for (table, label) in [(DISK, "drive"), (NET, "interface")] {
        let devices: Vec<(&String, &std::collections::BTreeMap<String, u64>)> = counters
            .iter()
            .filter(|(_, c)| c.contains_key(table[0].0))
            .collect();
        if devices.is_empty() {
            continue;
        }
        for (key, name, help, unit) in table {
            let mut f = family(&mut out, name, "counter", help);
            for (device, c) in &devices {
                let value = c.get(*key).copied().unwrap_or(0);
                f.sample(name, &[(label, device)], unit.show(value));
            }
        }
    }
    if let Some(m) = info.and_then(|i| i.migration.as_ref()) {
        let p = &m.progress;
        for (name, help, value) in [
            (
                "kubevirt_vmi_migration_data_processed_bytes",
                "Guest memory sent so far.",
                p.bytes_sent,
            ),
            (
                "kubevirt_vmi_migration_data_remaining_bytes",
                "Guest memory still to send.",
                p.bytes_left,
            ),
            (
                "kubevirt_vmi_migration_dirty_memory_rate_bytes",
                "Bytes the guest writes per second while it migrates.",
                p.dirty_pages_per_s * 4096,
            ),
        ] {
            family(&mut out, name, "gauge", help).sample(name, &[], value);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_running_vm_with_a_disk_and_a_nic() {
        let info: VmInfo = serde_json::from_value(serde_json::json!({
            "config": {"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 2},
                       "memory": {"size": 268435456}},
            "state": "Running",
        }))
        .unwrap();
        let counters: VmCounters = serde_json::from_value(serde_json::json!({
            "root": {"read_bytes": 4096, "write_bytes": 512, "read_ops": 1, "write_ops": 1,
                     "flushes": 3, "errors": 0, "discards": 0, "write_zeroes": 0,
                     "read_ns": 1_500_000, "write_ns": 2_000_000_000, "flush_ns": 0},
            "_net0": {"rx_bytes": 100, "tx_bytes": 200, "rx_frames": 1, "tx_frames": 2,
                      "rx_drops": 0, "tx_drops": 0, "rx_errors": 0, "tx_errors": 0},
            "_rng": {"bytes": 64},
        }))
        .unwrap();
        let process = ProcessStats {
            vcpu_seconds: vec![(0, 1.5), (1, 0.25)],
            resident_bytes: 5 << 20,
        };
        let page = render(Some(&info), &counters, &process);
        for line in [
            "# TYPE kubevirt_vmi_state gauge",
            "kubevirt_vmi_state{state=\"Running\"} 1",
            "kubevirt_vmi_memory_domain_bytes 268435456",
            "kubevirt_vmi_memory_resident_bytes 5242880",
            "kubevirt_vmi_vcpu_seconds_total{id=\"1\"} 0.250",
            "kubevirt_vmi_storage_read_traffic_bytes_total{drive=\"root\"} 4096",
            "kubevirt_vmi_storage_flush_requests_total{drive=\"root\"} 3",
            "kubevirt_vmi_storage_read_times_seconds_total{drive=\"root\"} 0.001500000",
            "kubevirt_vmi_storage_write_times_seconds_total{drive=\"root\"} 2.000000000",
            "kubevirt_vmi_network_transmit_bytes_total{interface=\"_net0\"} 200",
        ] {
            assert!(page.lines().any(|l| l == line), "no '{line}' in:\n{page}");
        }
        // Every sample belongs to the family declared just before it, declared once.
        let mut declared = std::collections::BTreeSet::new();
        let mut current = String::new();
        for line in page.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                current = rest.split(' ').next().unwrap().to_owned();
                assert!(declared.insert(current.clone()), "{current} twice");
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert_eq!(name, current, "{line}");
            }
        }
        let empty = render(None, &VmCounters::new(), &ProcessStats::default());
        assert!(
            empty.contains("kubevirt_vmi_state{state=\"None\"} 1"),
            "{empty}"
        );
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
