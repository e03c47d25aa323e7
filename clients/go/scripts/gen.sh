#!/usr/bin/env bash
# Generates clients/go/gen/ from proto/ with pinned tools, installed by
# `go install` from the Go module proxy into the repo's target/go-bin/ (no
# system protoc, nothing installed by hand).
#
#   scripts/gen.sh           regenerate gen/ in place
#   scripts/gen.sh --check   regenerate into a temp dir and fail if gen/ differs
#
# Bumping a version here changes the generated headers; commit both together.
set -euo pipefail

BUF_VERSION=v1.75.0
PROTOC_GEN_GO_VERSION=v1.36.12
PROTOC_GEN_GO_GRPC_VERSION=v1.6.2

here=$(cd "$(dirname "$0")/.." && pwd)  # clients/go
root=$(cd "$here/../.." && pwd)
export GOBIN="${GOBIN_TOLLGATE:-$root/target/go-bin}"
export PATH="$GOBIN:$PATH"
mkdir -p "$GOBIN"

# install NAME WANT-IN-VERSION-OUTPUT MODULE@VERSION: skips the build when the
# binary in GOBIN already reports the pinned version.
install() {
  local name=$1 want=$2 pkg=$3
  if [[ -x "$GOBIN/$name" ]] && "$GOBIN/$name" --version 2>&1 | grep -qF -- "$want"; then
    return
  fi
  echo "installing $pkg into $GOBIN" >&2
  go install "$pkg"
}
install buf "${BUF_VERSION#v}" "github.com/bufbuild/buf/cmd/buf@$BUF_VERSION"
install protoc-gen-go "$PROTOC_GEN_GO_VERSION" "google.golang.org/protobuf/cmd/protoc-gen-go@$PROTOC_GEN_GO_VERSION"
install protoc-gen-go-grpc "${PROTOC_GEN_GO_GRPC_VERSION#v}" "google.golang.org/grpc/cmd/protoc-gen-go-grpc@$PROTOC_GEN_GO_GRPC_VERSION"

cd "$here"
if [[ "${1:-}" == "--check" ]]; then
  out=$(mktemp -d)
  trap 'rm -rf "$out"' EXIT
  buf generate "$root/proto" --template buf.gen.yaml --output "$out"
  if ! diff -ru gen "$out/gen"; then
    echo "clients/go/gen is out of date with proto/: run clients/go/scripts/gen.sh and commit the result" >&2
    exit 1
  fi
  echo "clients/go/gen matches proto/" >&2
else
  rm -rf gen
  buf generate "$root/proto" --template buf.gen.yaml
fi
