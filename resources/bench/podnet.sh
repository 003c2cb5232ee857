#!/usr/bin/env bash
# Pod-network benchmark (docs/benchmarks.md): iperf3 between a fake node and the default guest
# through a plain tap and through the launcher's bridge and masquerade bindings, podvisor and
# QEMU on the same paths, in one test-host session. Arguments are passed to podnet_bench.py
# (--runs, --net-secs, --only tap|bridge|masquerade, --json, ...). Boots are kept in a run
# record (target/bench/podnet-*.jsonl) and resumed by a new test host when one freezes
# (resume.sh).
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/../../scripts/common.sh"
source "$(dirname -- "${BASH_SOURCE[0]}")/resume.sh"

pv_bench_prepare ip:iproute2 iperf3:iperf3 nft:nftables
pv_bench_run podnet 300 resources/bench/podnet_bench.py "$@"
