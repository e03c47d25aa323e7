#!/usr/bin/env bash
# The fault matrix, whole: every fault of tests/it/fault_matrix.rs against
# real redis-server / redis-sentinel processes on loopback (Sentinel: 1
# primary, 1 replica, 3 sentinels; Cluster: 3 primaries), two Tollgate
# replicas (one failure_mode open, one closed), callers on one hot bucket
# and many cold ones. The network blackhole uses the tests' own TCP fault
# proxy (tests/it/common/proxy.rs). About a minute; not run in CI (the
# fast cases are).
#
#   benches/chaos/run.sh           # prints the table; writes target/chaos/faults.{md,json}
#
# Exits non-zero if any fault over-admits outside the window the README
# documents (asynchronous replication at a Sentinel failover).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
while IFS='=' read -r k v; do export "$k=$v"; done < <(bash scripts/install-test-deps.sh)
out="$root/target/chaos"
mkdir -p "$out"
export FAULT_MATRIX_DIR="$out"
cargo test --test it -- --ignored --exact fault_matrix::full_matrix --nocapture --test-threads 1 \
  >"$out/run.log" 2>&1 || { tail -40 "$out/run.log" >&2; exit 1; }
cat "$out/faults.md"
{
  echo
  echo "machine: $(nproc) cores, $(uname -sr); $(redis-server --version | cut -d' ' -f1-3); debug build"
  echo "written: $out/faults.md, $out/faults.json"
} >&2
