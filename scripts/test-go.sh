#!/usr/bin/env bash
# Checks the Go client (clients/go) the way CI does: the committed stubs match
# proto/, gofmt and go vet are clean, go.mod is tidy, and go test passes
# against the real tollgate binary.
#
#   scripts/test-go.sh [PATH/TO/tollgate]
#
# The binary comes from the first argument, else $TOLLGATE_BIN, else
# target/debug/tollgate. Go tools (buf, protoc-gen-go, protoc-gen-go-grpc) are
# installed at pinned versions into target/go-bin/ by clients/go/scripts/gen.sh.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

if ! command -v go >/dev/null; then
  echo "test-go.sh: no go command; the Go client needs Go 1.26 or later" >&2
  exit 2
fi

bin=${1:-${TOLLGATE_BIN:-$root/target/debug/tollgate}}
if [[ ! -x "$bin" ]]; then
  echo "test-go.sh: no tollgate binary at '$bin'; build it (cargo build) or pass its path" >&2
  exit 2
fi
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")

cd "$root/clients/go"
bash scripts/gen.sh --check

unformatted=$(gofmt -l .)
if [[ -n "$unformatted" ]]; then
  echo "gofmt -l lists files that need formatting:" >&2
  echo "$unformatted" >&2
  exit 1
fi
# internal/interop is a module of its own, so that go-grpc-middleware (which
# its test plugs grpclimit into) is never a dependency of the client module.
for module in . internal/interop; do
  (
    cd "$module"
    go mod tidy -diff
    go vet ./...
    TOLLGATE_BIN=$bin go test -race -count=1 ./...
  )
done
