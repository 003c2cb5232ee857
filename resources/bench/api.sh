#!/usr/bin/env bash
# API benchmark (docs/benchmarks.md): vmm.ping and vm.info latency (p50, p99) and requests per
# second with 1 and 8 concurrent clients over the Unix socket, on the host (no guest needed).
# Arguments go to the bench binary: --seconds N (default 5), --socket PATH (a running server).
set -euo pipefail
source "$(dirname -- "${BASH_SOURCE[0]}")/../../scripts/common.sh"

pv_rust
cargo build --release --quiet -p api --example api_bench
nproc_line="$(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
echo "machine: ${nproc_line}, $(uname -sr)"
exec target/release/examples/api_bench "$@"
