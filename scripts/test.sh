#!/usr/bin/env bash
# Runs every test: installs the real parts the tests start (Redis, Envoy),
# then the whole cargo test suite (the server, the Rust client and its
# example proxy, and the doctests), then the deploy checks (hadolint,
# kubernetes-validate, helm, the dashboard against the built binary's
# metrics), then the Go client's tests against the same binary.
# Extra arguments go to `cargo test`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
while IFS='=' read -r k v; do export "$k=$v"; done < <(bash scripts/install-test-deps.sh)
cargo test --all-targets "$@"
# `--all-targets` leaves out doctests; run them too on a whole run (with
# extra arguments the caller asked for something narrower).
if [ $# -eq 0 ]; then
  cargo test --doc --workspace
fi
bin="${CARGO_TARGET_DIR:-target}/debug/tollgate"
TOLLGATE_BIN="$bin" bash scripts/check-deploy.sh
bash scripts/test-go.sh "$bin"
