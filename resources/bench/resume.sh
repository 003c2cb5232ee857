# shellcheck shell=bash
# Sourced by the benchmark scripts: run a benchmark until it finishes, in test hosts that are
# replaced, resuming from the benchmark's run record, when one freezes or dies.

# pv_bench_prepare [NEED...] - what every VM benchmark needs: Rust, QEMU, python3 and the
# pv_need NEEDs given, the release podvisor and the default guest.
pv_bench_prepare() {
    pv_rust
    pv_qemu
    pv_need python3:python3 "$@"
    cargo build --release --quiet
    resources/guest/build.sh
}

# pv_bench_run NAME STALL_S SCRIPT ARGS... - run `python3 SCRIPT --state STATE ARGS...`, where
# SCRIPT appends every finished run to its run record STATE and skips those STATE already
# holds. STATE is $PODVISOR_BENCH_STATE or a new target/bench/NAME-DATE.jsonl. With hardware
# KVM the benchmark runs here; otherwise inside a test host: when STATE has not grown for
# STALL_S seconds ($PODVISOR_BENCH_STALL_S overrides) the test host is taken as frozen and
# stopped; a frozen or dead (exit 125) test host is replaced by a new one that carries on, up
# to 8 test hosts. Exits with the benchmark's status.
pv_bench_run() {
    local name="$1" stall="${PODVISOR_BENCH_STALL_S:-$2}" script="$3" tries=8
    local state attempt started pid stalled last rc why
    shift 3
    [[ "$stall" =~ ^[1-9][0-9]*$ ]] || pv_die "PODVISOR_BENCH_STALL_S must be a number of seconds, not '$stall'"
    mkdir -p target/bench
    state="${PODVISOR_BENCH_STATE:-target/bench/$name-$(date +%Y%m%d-%H%M%S).jsonl}"
    pv_say "run record: $state"
    local bench=(python3 "$script" --state "$state" "$@")
    if pv_hw_kvm; then
        exec "${bench[@]}"
    fi
    for attempt in $(seq "$tries"); do
        started=$(date +%s)
        resources/testhost/run.sh "${bench[@]}" &
        pid=$!
        stalled=0
        while kill -0 "$pid" 2>/dev/null; do
            sleep 5
            last=$(stat -c %Y "$state" 2>/dev/null || echo 0)
            ((last > started)) || last=$started
            if (($(date +%s) - last > stall)); then
                stalled=1
                kill "$pid" 2>/dev/null || true
                break
            fi
        done
        rc=0
        wait "$pid" || rc=$?
        if ((stalled)); then
            why="did nothing for ${stall} s (frozen)"
        elif ((rc == 125)); then
            why="failed"
        else
            exit "$rc"
        fi
        if ((attempt < tries)); then
            pv_say "the test host $why: a new one resumes the $name run (try $((attempt + 1)) of $tries)"
        fi
    done
    pv_die "the test host froze or failed $tries times; the runs so far are in $state;" \
        "resume with: PODVISOR_BENCH_STATE=$state $0$(printf ' %q' "$@")"
}
