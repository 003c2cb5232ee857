# shellcheck shell=bash
# Sourced by the benchmark scripts: run a benchmark in test hosts until it finishes, resuming
# from its run record when a test host freezes or dies.

# pv_bench_resumable NAME STATE STALL_S CMD... - run CMD (a benchmark that appends every
# finished run to STATE and skips those STATE already holds) inside a test host. When STATE
# has not grown for STALL_S seconds the test host is taken as frozen and stopped; a frozen or
# dead (exit 125) test host is replaced by a new one that carries on, up to 8 test hosts.
# Exits with the benchmark's status.
pv_bench_resumable() {
    local name="$1" state="$2" stall="$3" tries=8 attempt started pid stalled last rc why
    shift 3
    [[ "$stall" =~ ^[1-9][0-9]*$ ]] || pv_die "PODVISOR_BENCH_STALL_S must be a number of seconds, not '$stall'"
    for attempt in $(seq "$tries"); do
        started=$(date +%s)
        resources/testhost/run.sh "$@" &
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
        "resume with: PODVISOR_BENCH_STATE=$state $0 (same arguments)"
}
