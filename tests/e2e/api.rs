//! Control API scenarios: a pod's VM driven over the REST socket with `podvisor ctl`, as the
//! node controller would: create, boot, pause and resume (the guest really stops, its clock
//! does not count the pause), reboot, power button, counters, delete, and the event monitor.

use std::time::{Duration, Instant};

use libtest_mimic::{Failed, Trial};

use crate::harness::{guest, hang_tolerant, host, host_ok, podvisor, NetNs, Scratch, Vm};

/// `podvisor ctl --api-socket SOCKET ARGS...`: exit code and output.
fn ctl(socket: &str, args: &[&str]) -> Result<(i32, String), Failed> {
    let mut all = vec!["ctl", "--api-socket", socket];
    all.extend_from_slice(args);
    host(podvisor(), &all)
}

pub(crate) fn ctl_ok(socket: &str, args: &[&str]) -> Result<String, Failed> {
    let (rc, out) = ctl(socket, args)?;
    if rc != 0 {
        return Err(format!("podvisor ctl {args:?} exited {rc}: {out}").into());
    }
    Ok(out)
}

fn state(socket: &str) -> Result<String, Failed> {
    let out = ctl_ok(socket, &["info"])?;
    let info: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| format!("vm.info is not JSON ({e}): {out}"))?;
    Ok(info["state"].as_str().unwrap_or_default().to_owned())
}

fn wait_for_state(socket: &str, wanted: &str) -> Result<(), Failed> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let now = state(socket)?;
        if now == wanted {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("the VM stayed {now}, expected {wanted}").into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits until the socket answers `vmm.ping`.
fn wait_for_socket(vm: &mut Vm, socket: &str) -> Result<(), Failed> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while ctl(socket, &["ping"])?.0 != 0 {
        if Instant::now() > deadline || vm.exited() {
            return Err(vm.failure("the API socket never answered"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The guest's uptime in seconds (`/proc/uptime`).
fn guest_uptime(vm: &mut Vm) -> Result<f64, Failed> {
    let out = vm.shell_ok("cat /proc/uptime")?;
    // "UPTIME IDLE", possibly amid job-control messages of the shell.
    out.lines()
        .rev()
        .find_map(|line| {
            let words: Vec<f64> = line
                .split_whitespace()
                .map(|w| w.parse().ok())
                .collect::<Option<_>>()?;
            (words.len() == 2).then_some(words[0])
        })
        .ok_or_else(|| vm.failure(&format!("no uptime in '{out}'")))
}

/// The default guest as a `VmConfig` payload: bzImage, initramfs, a quiet console.
fn default_guest() -> serde_json::Value {
    serde_json::json!({
        "kernel": guest("bzImage"),
        "initramfs": guest("initramfs.cpio.gz"),
        "cmdline": "console=ttyS0 quiet",
    })
}

fn served_vm_lifecycle() -> Result<(), Failed> {
    let dir = Scratch::new("api");
    let socket = dir.arg("api.sock");
    let events = dir.path("events.jsonl");
    let config = serde_json::json!({
        "payload": default_guest(),
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 512u64 << 20},
        "rng": {"src": "/dev/urandom"},
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
    });
    let config_file = dir.path("vm.json");
    std::fs::write(&config_file, config.to_string())?;

    let mut vm = Vm::spawn(
        "serve",
        &[
            "--api-socket",
            &socket,
            "--event-monitor",
            &format!("path={}", events.display()),
        ],
    );
    wait_for_socket(&mut vm, &socket)?;
    let mode = std::fs::metadata(&socket)?.permissions();
    if std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777 != 0o600 {
        return Err(format!(
            "the API socket has mode {:o}",
            std::os::unix::fs::PermissionsExt::mode(&mode)
        )
        .into());
    }
    // No VM yet: an error answer, and ctl says so with a non-zero exit.
    if ctl(&socket, &["info"])?.0 == 0 {
        return Err("vm.info without a VM succeeded".into());
    }
    ctl_ok(&socket, &["create", config_file.to_str().unwrap()])?;
    if state(&socket)? != "Created" {
        return Err("not Created after vm.create".into());
    }
    let (rc, out) = ctl(&socket, &["pause"])?;
    if rc == 0 || !out.contains("409") {
        return Err(format!("pausing a Created VM: rc {rc}, {out}").into());
    }
    ctl_ok(&socket, &["boot"])?;
    vm.expect("podvisor-guest ready:")?;
    vm.wait_for_shell()?;
    if state(&socket)? != "Running" {
        return Err("not Running after vm.boot".into());
    }

    // Pause: a ticker in the guest stops, the guest's clock does not count the pause.
    vm.shell_ok("(while :; do echo tick; sleep 0.2; done) & echo $! > /tmp/ticker")?;
    let clocksource =
        vm.shell_ok("cat /sys/devices/system/clocksource/clocksource0/current_clocksource")?;
    let up0 = guest_uptime(&mut vm)?;
    let wall0 = Instant::now();
    ctl_ok(&socket, &["pause"])?;
    let paused_at = vm.output_len();
    let pause = Duration::from_secs(3);
    std::thread::sleep(pause);
    if state(&socket)? != "Paused" {
        return Err("not Paused after vm.pause".into());
    }
    if vm.output_len() != paused_at {
        return Err(vm.failure("the guest printed while paused"));
    }
    ctl_ok(&socket, &["resume"])?;
    vm.expect("tick")?;
    vm.shell_ok("kill $(cat /tmp/ticker)")?;
    let up1 = guest_uptime(&mut vm)?;
    let wall = wall0.elapsed().as_secs_f64();
    let guest_elapsed = up1 - up0;
    if guest_elapsed <= 0.0 {
        return Err(vm.failure(&format!("guest clock went from {up0} to {up1}")));
    }
    if clocksource.trim() == "kvm-clock" && guest_elapsed > wall - pause.as_secs_f64() + 1.0 {
        return Err(vm.failure(&format!(
            "the guest's clock counted the pause: {guest_elapsed:.2} s of guest time in {wall:.2} s with {pause:?} paused"
        )));
    }

    let counters: serde_json::Value = serde_json::from_str(&ctl_ok(&socket, &["counters"])?)?;
    if counters["_rng"]["bytes"].as_u64().is_none() {
        return Err(format!("no rng counters in {counters}").into());
    }

    ctl_ok(&socket, &["reboot"])?;
    vm.expect("podvisor-guest ready:")?;
    vm.wait_for_shell()?;
    wait_for_state(&socket, "Running")?;

    // The power button: the guest's acpid powers it off; the served VM stays, Shutdown.
    vm.shell_ok("pidof acpid")?;
    ctl_ok(&socket, &["power-button"])?;
    wait_for_state(&socket, "Shutdown")?;
    ctl_ok(&socket, &["delete"])?;
    if ctl(&socket, &["info"])?.0 == 0 {
        return Err("vm.info after vm.delete succeeded".into());
    }
    ctl_ok(&socket, &["shutdown-vmm"])?;
    let status = vm.wait()?;
    if status.code() != Some(0) {
        return Err(vm.failure(&format!("podvisor serve exited with {status}")));
    }
    if std::path::Path::new(&socket).exists() {
        return Err("the API socket was left behind".into());
    }

    let seen: Vec<String> = std::fs::read_to_string(&events)?
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_default();
            format!(
                "{}:{}",
                v["source"].as_str().unwrap_or("?"),
                v["event"].as_str().unwrap_or("?")
            )
        })
        .collect();
    let wanted = [
        "vm:created",
        "vm:booting",
        "vm:booted",
        "vm:pausing",
        "vm:paused",
        "vm:resuming",
        "vm:resumed",
        "vm:rebooting",
        "vm:rebooted",
        "vm:shutdown",
        "vm:deleted",
        "vmm:shutdown",
    ];
    if seen != wanted {
        return Err(format!("events {seen:?}, expected {wanted:?}").into());
    }
    Ok(())
}

/// `podvisor run --api-socket`: the command-line VM is Running and answers; vm.shutdown ends
/// podvisor with status 0.
fn run_with_api_socket() -> Result<(), Failed> {
    let dir = Scratch::new("apirun");
    let socket = dir.arg("run.sock");
    let mut vm = Vm::boot_with(
        "vmlinux",
        1,
        "256M",
        "console=ttyS0 quiet",
        &["--api-socket", &socket],
    );
    vm.expect("podvisor-guest ready:")?;
    wait_for_socket(&mut vm, &socket)?;
    if state(&socket)? != "Running" {
        return Err("the command-line VM is not Running".into());
    }
    let second = dir.path("second.json");
    let config = serde_json::json!({
        "payload": {"kernel": guest("vmlinux")},
        "cpus": {"boot_vcpus": 1},
        "memory": {"size": 256u64 << 20},
    });
    std::fs::write(&second, config.to_string())?;
    let (rc, out) = ctl(&socket, &["create", second.to_str().unwrap()])?;
    if rc == 0 || !out.contains("409") {
        return Err(format!("a second vm.create: rc {rc}, {out}").into());
    }
    ctl_ok(&socket, &["shutdown"])?;
    let status = vm.wait()?;
    if status.code() != Some(0) {
        return Err(vm.failure(&format!(
            "podvisor run exited with {status} after vm.shutdown"
        )));
    }
    Ok(())
}

/// The first `count:N` line the console prints from now on, and its N (a pattern that ends
/// with a colon makes `expect` wait for the whole line).
fn next_count(vm: &mut Vm) -> Result<u64, Failed> {
    let line = vm.expect("count:")?;
    line.trim_start_matches("count:")
        .trim()
        .parse()
        .map_err(|_| vm.failure(&format!("not a count line: '{line}'")))
}

/// A `podvisor serve` on `socket` running the default guest (2 vCPUs, 256 MiB) with a 16 MiB
/// raw disk (returned) and tap `tap` (host side `host_ip`), booted to its shell, its eth0 up at
/// `guest_ip` and answering a ping, `data` written into the disk's second 4 KiB block.
fn serve_guest_with_disk_and_net(
    dir: &Scratch,
    socket: &str,
    tap: &str,
    (host_ip, guest_ip): (&str, &str),
    data: &str,
    format: &str,
) -> Result<(Vm, String), Failed> {
    let disk = dir.arg(&format!("disk.{format}"));
    host_ok("qemu-img", &["create", "-q", "-f", format, &disk, "64M"])?;
    let config = serde_json::json!({
        "payload": default_guest(),
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 256u64 << 20},
        "disks": [{"path": disk, "format": format}],
        "net": [{"tap": tap, "ip": host_ip, "mask": "255.255.255.0"}],
        "rng": {"src": "/dev/urandom"},
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
    });
    let config_file = dir.path("vm.json");
    std::fs::write(&config_file, config.to_string())?;
    let mut vm = Vm::spawn("serve", &["--api-socket", socket]);
    wait_for_socket(&mut vm, socket)?;
    ctl_ok(socket, &["create", config_file.to_str().unwrap()])?;
    ctl_ok(socket, &["boot"])?;
    vm.expect("podvisor-guest ready:")?;
    vm.wait_for_shell()?;
    vm.shell_ok(&format!(
        "ip link set eth0 up && ip addr add {guest_ip}/24 dev eth0 && ping -c 1 -W 10 {host_ip}"
    ))?;
    vm.shell_ok(&format!(
        "printf {data} | dd of=/dev/vda bs=4096 seek=1 conv=sync,fsync 2>/dev/null"
    ))?;
    Ok((vm, disk))
}

/// A VM with a disk, a network interface and a counter running in its shell is paused and
/// snapshotted by `podvisor serve`, which then ends; `podvisor run --restore` in a new process
/// continues it: the counter goes on from where it stopped, the guest's clock did not jump,
/// the disk holds what was written before and takes new writes, and the network answers on
/// the other tap the restore gave it (`--net-tap`).
fn snapshot_and_restore_in_a_new_process() -> Result<(), Failed> {
    const HOST_IP: &str = "192.168.250.1";
    const GUEST_IP: &str = "192.168.250.2";
    let dir = Scratch::new("snapshot");
    let socket = dir.arg("api.sock");
    // The snapshot goes to the test host's own tmpfs: 256 MiB over virtiofs would be slow.
    let snapshot = format!("/dev/shm/podvisor-e2e-snapshot-{}", std::process::id());
    let _ = std::fs::remove_dir_all(&snapshot);
    let tap = format!("pvs{}", std::process::id() % 100_000);
    let (mut vm, disk) = serve_guest_with_disk_and_net(
        &dir,
        &socket,
        &tap,
        (HOST_IP, GUEST_IP),
        "snap-data-42",
        "raw",
    )?;
    let up_before = guest_uptime(&mut vm)?;
    let host_mac = std::fs::read_to_string(format!("/sys/class/net/{tap}/address"))?;
    vm.shell_ok(
        "(i=0; while :; do i=$((i+1)); echo count:$i; sleep 0.3; done) & echo $! > /tmp/counter",
    )?;
    let first = next_count(&mut vm)?;
    let seen = next_count(&mut vm)?;
    if seen != first + 1 {
        return Err(vm.failure(&format!("the counter went {first}, {seen}")));
    }
    ctl_ok(&socket, &["pause"])?;
    let (rc, out) = ctl(&socket, &["restore", &snapshot])?;
    if rc == 0 || !out.contains("409") {
        return Err(format!("vm.restore beside a VM: rc {rc}, {out}").into());
    }
    ctl_ok(&socket, &["snapshot", &snapshot])?;
    let (rc, out) = ctl(&socket, &["snapshot", &snapshot])?;
    if rc == 0 || !out.contains("400") || !out.contains("not empty") {
        return Err(format!("a second snapshot into the same directory: rc {rc}, {out}").into());
    }
    ctl_ok(&socket, &["shutdown-vmm"])?;
    let status = vm.wait()?;
    if status.code() != Some(0) {
        return Err(vm.failure(&format!("podvisor serve exited with {status}")));
    }

    // A new process: the VM, running on, its network interface on another tap.
    let tap2 = format!("pvr{}", std::process::id() % 100_000);
    let mut vm = Vm::spawn(
        "run",
        &[
            "--restore",
            &snapshot,
            "--net-tap",
            &format!("_net0={tap2}"),
        ],
    );
    let next = next_count(&mut vm)?;
    if next <= seen || next > seen + 5 {
        return Err(vm.failure(&format!(
            "after the restore the counter printed {next}; before the snapshot it was at {seen}"
        )));
    }
    let after = next_count(&mut vm)?;
    if after != next + 1 {
        return Err(vm.failure(&format!("the restored counter went {next}, {after}")));
    }
    vm.shell_ok("kill $(cat /tmp/counter)")?;
    let up_after = guest_uptime(&mut vm)?;
    if up_after < up_before || up_after - up_before > 120.0 {
        return Err(vm.failure(&format!(
            "the guest's uptime went from {up_before:.1} s to {up_after:.1} s across the snapshot"
        )));
    }
    let data = vm.shell_ok(
        "echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=4096 skip=1 count=1 2>/dev/null | head -c 12",
    )?;
    if !data.contains("snap-data-42") {
        return Err(vm.failure(&format!("the disk reads '{data}' after the restore")));
    }
    vm.shell_ok(
        "printf after-restore | dd of=/dev/vda bs=4096 seek=2 conv=sync,fsync 2>/dev/null",
    )?;
    // The tap is another, its host side the same MAC (derived from the guest's): the guest's
    // neighbour table holds.
    let host_mac_now = std::fs::read_to_string(format!("/sys/class/net/{tap2}/address"))?;
    if host_mac_now != host_mac {
        return Err(vm.failure(&format!(
            "the host side's MAC went from {host_mac} to {host_mac_now} with the tap"
        )));
    }
    vm.shell_ok(&format!("ping -c 1 -W 10 {HOST_IP}"))?;
    let (_, link) = host("ip", &["-o", "addr", "show", "dev", &tap2])?;
    if !link.contains(HOST_IP) {
        return Err(vm.failure(&format!("the restored VM's tap {tap2}: {link}")));
    }
    vm.poweroff()?;
    let _ = std::fs::remove_dir_all(&snapshot);
    let image = std::fs::read(&disk)?;
    if !image[8192..].starts_with(b"after-restore") {
        return Err("the restored guest's write is not in the disk image".into());
    }
    Ok(())
}

/// Waits (30 s at most, and while `alive`) until a destination's Unix socket `path` exists.
fn listening(path: &std::path::Path, mut alive: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        if Instant::now() > deadline || !alive() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// A VM with a disk, a network interface, a counter and a loop that keeps rewriting 8 MiB of
/// its memory (with the checksum of each complete pass) is live-migrated by `podvisor serve`
/// to another `podvisor serve` in another network namespace (a second pod with its own tap of
/// the same name) over a Unix socket, while it runs. Through a link slower than the guest
/// writes, the first try cannot converge: it gives up, the guest runs on at the source and the
/// destination keeps nothing; with auto-converge the second try, to `podvisor run
/// --receive-migration` (a new pod's entrypoint), does. From there a `local` migration hands
/// the guest's memory to a third VMM in the same pod, on another tap (`--net-tap`). Then the
/// counter goes on, the memory matches its checksum, the clock did not jump, the disk holds
/// what was written and takes new writes, the network answers on the third VMM's tap, and
/// neither the source nor the middle VMM has the VM any more.
fn live_migration_to_another_pod() -> Result<(), Failed> {
    const HOST_IP: &str = "192.168.251.1";
    const GUEST_IP: &str = "192.168.251.2";
    let dir = Scratch::new("migrate");
    let (source_socket, dest_socket) = (dir.arg("source.sock"), dir.arg("dest.sock"));
    let migration = format!("unix:{}", dir.arg("migration.sock"));
    let netns = NetNs::new(format!("pvm{}", std::process::id() % 100_000))?;
    let tap = format!("pvm{}", std::process::id() % 100_000);
    let (mut source, disk) = serve_guest_with_disk_and_net(
        &dir,
        &source_socket,
        &tap,
        (HOST_IP, GUEST_IP),
        "migrate-data-42",
        "qcow2",
    )?;
    let up_before = guest_uptime(&mut source)?;
    source.shell_ok(
        "(while [ ! -e /tmp/stop ]; do dd if=/dev/urandom of=/tmp/blob bs=1M count=8 \
           conv=notrunc 2>/dev/null; md5sum /tmp/blob > /tmp/sum; done; touch /tmp/stopped) \
           >/dev/null 2>&1 &",
    )?;
    // The disk (qcow2) gets a new cluster every half second, flushed: the destination, which
    // opens the image while the source runs, must read what the source allocated meanwhile.
    source.shell_ok(
        "(i=0; while [ ! -e /tmp/stop ] && [ $i -lt 900 ]; do i=$((i+1)); printf disk-$i | \
           dd of=/dev/vda bs=65536 seek=$((16+i)) conv=sync,fsync 2>/dev/null; \
           echo $i > /tmp/disklast; sleep 0.5; done; touch /tmp/diskstopped) >/dev/null 2>&1 &",
    )?;
    source.shell_ok(
        "(i=0; while :; do i=$((i+1)); echo count:$i; sleep 0.3; done) & echo $! > /tmp/counter",
    )?;
    let seen = next_count(&mut source)?;
    let (rc, out) = ctl(&source_socket, &["send-migration", "tcp:nohost"])?;
    if rc == 0 || !out.contains("400") {
        return Err(format!("a bad destination URL: rc {rc}, {out}").into());
    }

    let mut dest = Vm::spawn_in_netns(&netns.0, "serve", &["--api-socket", &dest_socket]);
    wait_for_socket(&mut dest, &dest_socket)?;
    let receive = || -> Result<std::process::Child, Failed> {
        let receiver = std::process::Command::new(podvisor())
            .args([
                "ctl",
                "--api-socket",
                &dest_socket,
                "receive-migration",
                &migration,
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        if !listening(&dir.path("migration.sock"), || true) {
            return Err("the destination does not listen".into());
        }
        Ok(receiver)
    };
    // Through a link slower than the guest writes memory, the copy cannot converge: the
    // migration gives up, the guest runs on at the source, the destination keeps nothing.
    const SLOW_LINK: &str = "3000000";
    let receiver = receive()?;
    let (rc, out) = ctl(
        &source_socket,
        &[
            "send-migration",
            &migration,
            "--bandwidth-limit",
            SLOW_LINK,
            "--completion-timeout-s",
            "15",
        ],
    )?;
    if rc == 0 || !out.contains("did not converge") {
        return Err(format!("a migration that cannot converge: rc {rc}, {out}").into());
    }
    let info: serde_json::Value = serde_json::from_str(&ctl_ok(&source_socket, &["info"])?)?;
    if info["state"] != "Running"
        || info["migration"]["state"] != "Failed"
        || !info["migration"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("did not converge"))
    {
        return Err(format!("vm.info after the failed migration: {info}").into());
    }
    let refused = receiver.wait_with_output()?;
    if refused.status.success() {
        return Err("the destination took a migration the source gave up".into());
    }
    let (rc, out) = ctl(&dest_socket, &["info"])?;
    if rc == 0 || !out.contains("404") {
        return Err(format!("the destination kept a VM: {out}").into());
    }
    source.skip_output();
    let resumed = next_count(&mut source)?;
    if resumed <= seen {
        return Err(source.failure("the counter stopped after the failed migration"));
    }
    // The pod's own entrypoint takes it this time: `podvisor run --receive-migration`.
    ctl_ok(&dest_socket, &["shutdown-vmm"])?;
    if dest.wait()?.code() != Some(0) {
        return Err(dest.failure("the destination's podvisor serve did not exit 0"));
    }
    let run_socket = dir.arg("run.sock");
    let mut dest = Vm::spawn_in_netns(
        &netns.0,
        "run",
        &[
            "--receive-migration",
            &migration,
            "--api-socket",
            &run_socket,
        ],
    );
    if !listening(&dir.path("migration.sock"), || !dest.exited()) {
        return Err(dest.failure("podvisor run --receive-migration does not listen"));
    }
    // With auto-converge the guest is slowed down until the copy converges on the same link.
    let mut sender = std::process::Command::new(podvisor())
        .args([
            "ctl",
            "--api-socket",
            &source_socket,
            "send-migration",
            &migration,
        ])
        .args(["--bandwidth-limit", SLOW_LINK, "--auto-converge"])
        .args(["--completion-timeout-s", "150"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // Meanwhile vm.info shows how it goes.
    let mut rounds_seen = false;
    let watching = Instant::now() + Duration::from_secs(150);
    while !rounds_seen && Instant::now() < watching && sender.try_wait()?.is_none() {
        let (_, out) = ctl(&source_socket, &["info"])?;
        let info: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        rounds_seen = info["migration"]["state"] == "Sending"
            && info["migration"]["round"].as_u64().is_some_and(|r| r >= 1);
        std::thread::sleep(Duration::from_millis(200));
    }
    let sent = sender.wait_with_output()?;
    if !sent.status.success() {
        return Err(format!("send-migration: {}", String::from_utf8_lossy(&sent.stderr)).into());
    }
    if !rounds_seen {
        return Err("vm.info never showed the migration's rounds".into());
    }
    source.skip_output();
    if state(&run_socket)? != "Running" {
        return Err("the destination's VM is not Running".into());
    }
    let (rc, out) = ctl(&source_socket, &["info"])?;
    if rc == 0 || !out.contains("404") {
        return Err(format!("the source still has a VM: {out}").into());
    }

    // The guest, on at the destination.
    // The counter printed on at the source while the memory was copied: after its last
    // count there comes the next one here (or the one after, if the source's last line was
    // cut by the pause).
    let last = source
        .printed()
        .rsplit("count:")
        .find_map(|rest| rest.lines().next()?.trim().parse::<u64>().ok())
        .unwrap_or(resumed);
    let next = next_count(&mut dest)?;
    if next <= last || next > last + 3 {
        return Err(dest.failure(&format!(
            "after the migration the counter printed {next}; at the source it was at {last}"
        )));
    }
    let after = next_count(&mut dest)?;
    if after != next + 1 {
        return Err(dest.failure(&format!("the migrated counter went {next}, {after}")));
    }

    // On to a third VMM in the same pod, its memory handed over instead of copied (`local`),
    // its network interface on another tap (the one it leaves is still open there).
    let (local_socket, local) = (dir.arg("local.sock"), dir.arg("local-migration.sock"));
    let tap3 = format!("pvl{}", std::process::id() % 100_000);
    let mut third = Vm::spawn_in_netns(
        &netns.0,
        "run",
        &[
            "--receive-migration",
            &format!("unix:{local}"),
            "--api-socket",
            &local_socket,
            "--net-tap",
            &format!("_net0={tap3}"),
        ],
    );
    if !listening(&dir.path("local-migration.sock"), || !third.exited()) {
        return Err(third.failure("the third VMM does not listen"));
    }
    ctl_ok(
        &run_socket,
        &["send-migration", &format!("unix:{local}"), "--local"],
    )?;
    if dest.wait()?.code() != Some(0) {
        return Err(dest.failure("the VMM the guest left (local) did not exit 0"));
    }
    let last = dest
        .printed()
        .rsplit("count:")
        .find_map(|rest| rest.lines().next()?.trim().parse::<u64>().ok())
        .unwrap_or(after);
    let mut dest = third;
    let next = next_count(&mut dest)?;
    if next <= last || next > last + 3 {
        return Err(dest.failure(&format!(
            "after the local migration the counter printed {next}; before it was at {last}"
        )));
    }
    dest.shell_ok("kill $(cat /tmp/counter)")?;
    let sum = dest.shell_ok(
        "touch /tmp/stop; while [ ! -e /tmp/stopped ] || [ ! -e /tmp/diskstopped ]; do \
           sleep 0.2; done; md5sum -c /tmp/sum",
    )?;
    if !sum.contains("OK") {
        return Err(dest.failure(&format!("the rewritten memory fails its checksum: {sum}")));
    }
    let blocks = dest.shell_ok(
        "echo 3 > /proc/sys/vm/drop_caches; n=$(cat /tmp/disklast); bad=0; j=1; \
         while [ $j -le $n ]; do \
           [ \"$(dd if=/dev/vda bs=65536 skip=$((16+j)) count=1 2>/dev/null | head -c 12 | \
                tr -d '\\0')\" = disk-$j ] || bad=$((bad+1)); j=$((j+1)); done; \
         echo disk-blocks:$n bad:$bad",
    )?;
    if !blocks.contains(" bad:0") || blocks.contains("disk-blocks:0 ") {
        return Err(dest.failure(&format!(
            "the blocks written on the way read back wrong: {blocks}"
        )));
    }
    let up_after = guest_uptime(&mut dest)?;
    if up_after < up_before || up_after - up_before > 120.0 {
        return Err(dest.failure(&format!(
            "the guest's uptime went from {up_before:.1} s to {up_after:.1} s across the migration"
        )));
    }
    let data = dest.shell_ok(
        "echo 3 > /proc/sys/vm/drop_caches; dd if=/dev/vda bs=4096 skip=1 count=1 2>/dev/null | head -c 15",
    )?;
    if !data.contains("migrate-data-42") {
        return Err(dest.failure(&format!("the disk reads '{data}' after the migration")));
    }
    dest.shell_ok(
        "printf after-migration | dd of=/dev/vda bs=4096 seek=2 conv=sync,fsync 2>/dev/null",
    )?;
    // The destination's tap is another (its MAC too): the neighbour entry takes a few probes.
    dest.shell_ok(&format!(
        "for i in 1 2 3 4 5 6; do ping -c 1 -W 5 {HOST_IP} && break; done"
    ))?;
    let (_, link) = host(
        "ip",
        &[
            "netns", "exec", &netns.0, "ip", "-o", "addr", "show", "dev", &tap3,
        ],
    )?;
    if !link.contains(HOST_IP) {
        return Err(dest.failure(&format!("the third VMM's tap {tap3}: {link}")));
    }
    // The guest powers off where it runs now: `podvisor run` ends with it, status 0.
    dest.poweroff()?;
    ctl_ok(&source_socket, &["shutdown-vmm"])?;
    let status = source.wait()?;
    if status.code() != Some(0) {
        return Err(source.failure(&format!("the source's podvisor serve exited with {status}")));
    }
    let image = dir.arg("disk-now.raw");
    host_ok("qemu-img", &["check", "-q", &disk])?;
    host_ok("qemu-img", &["convert", "-O", "raw", &disk, &image])?;
    let image = std::fs::read(&image)?;
    if !image[8192..].starts_with(b"after-migration") {
        return Err("the migrated guest's write is not in the disk image".into());
    }
    Ok(())
}

/// The API scenarios.
pub fn trials() -> Vec<Trial> {
    vec![
        Trial::test("api_served_vm_lifecycle", || {
            hang_tolerant(served_vm_lifecycle)
        }),
        Trial::test("api_run_with_api_socket", || {
            hang_tolerant(run_with_api_socket)
        }),
        Trial::test("api_snapshot_and_restore_in_a_new_process", || {
            hang_tolerant(snapshot_and_restore_in_a_new_process)
        }),
        Trial::test("api_live_migration_to_another_pod", || {
            hang_tolerant(live_migration_to_another_pod)
        }),
    ]
}
