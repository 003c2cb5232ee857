#!/usr/bin/env bash
# seccomp-inventory.sh [FILTER...] - run end-to-end scenarios (all, or those whose names
# contain a FILTER) in one test-host session with `PODVISOR_SECCOMP=log`, and print the system
# calls podvisor's seccomp filters did not allow, by thread name, with their counts: what a
# thread kind's list in vmm/src/seccomp.rs or devices/src/seccomp.rs is missing. Nothing
# printed after "calls outside the filters:" means every call was on its thread's list.
# The scenarios' own results are in target/seccomp-inventory/e2e.log. See DEVELOPERS.md.
set -euo pipefail
cd "$(dirname -- "${BASH_SOURCE[0]}")/.."
out=target/seccomp-inventory

if [[ "${1:-}" == --inside ]]; then
    # In the test host: the kernel logs each call a filter lets through in log mode
    # (audit type 1326); without a rate limit, so that none is lost.
    shift
    e2e="$1"
    shift
    sysctl -q -w kernel.printk_ratelimit=0 kernel.printk_ratelimit_burst=1000000 || true
    dmesg -w >"$out/dmesg.log" 2>&1 &
    dmesg_pid=$!
    rc=0
    if (($# == 0)); then
        PODVISOR_SECCOMP=log "$e2e" --test-threads 1 >"$out/e2e.log" 2>&1 || rc=$?
    else
        for f in "$@"; do
            PODVISOR_SECCOMP=log "$e2e" --test-threads 1 "$f" >>"$out/e2e.log" 2>&1 || rc=$?
        done
    fi
    sleep 2
    kill "$dmesg_pid"
    exit "$rc"
fi

mkdir -p "$out"
rm -f "$out"/*.log
e2e="$(cargo test -p launcher --test e2e --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "e2e" and m.get("executable"):
        print(m["executable"])')"
[[ -x "$e2e" ]] || { echo "seccomp-inventory.sh: cannot build the e2e scenarios" >&2; exit 1; }
rc=0
# The kernel logs a seccomp action only with auditing on (no auditd: to its log, held back
# past the backlog limit).
PODVISOR_TESTHOST_APPEND="${PODVISOR_TESTHOST_APPEND:-} audit=1 audit_backlog_limit=65536" \
    resources/testhost/run.sh "$0" --inside "$e2e" "$@" || rc=$?
grep -E '^test |test result' "$out/e2e.log" || true
echo "calls outside the filters (count, thread, system call number):"
grep 'type=1326' "$out/dmesg.log" |
    sed -nE 's/.*comm="([^"]*)".*syscall=([0-9]+).*/\1 \2/p' |
    sort | uniq -c | sort -rn
exit "$rc"
