#!/usr/bin/env bash
# Soak: Tollgate on a local Redis at a fixed rate for a long time (default
# 10 minutes), sampling Tollgate's RSS and Redis's memory every 30 s. Not
# run in CI. Prints a table and writes target/soak/soak.json.
#
#   benches/soak/run.sh                       # 600 s at 500 decisions/s
#   DURATION=120 RATE=1000 benches/soak/run.sh
#
# Passes when no call failed and memory stayed flat: the last sample's RSS
# and Redis memory are within SLACK_PERCENT (default 20%) of the sample at
# the first minute, once the active buckets exist.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
DURATION=${DURATION:-600}
RATE=${RATE:-500}
IDENTITIES=${IDENTITIES:-20000}
EVERY=${EVERY:-30}
SLACK_PERCENT=${SLACK_PERCENT:-20}
target=${CARGO_TARGET_DIR:-$root/target}
out="$root/target/soak"
mkdir -p "$out"
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

echo "soak: building release binaries" >&2
cargo build --release --quiet -p tollgate --bin tollgate -p tollgate-bench-tools --bin loadgen

rport=$(free_port); gport=$(free_port)
redis-server --port "$rport" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" >"$work/redis.log" 2>&1 &
pids+=($!)
until redis-cli -p "$rport" ping >/dev/null 2>&1; do sleep 0.1; done

# The config in a directory of its own: Tollgate watches its config's
# directory, and the logs written into $work would wake it.
mkdir -p "$work/conf"
cat >"$work/conf/tollgate.yaml" <<YAML
listen: 127.0.0.1:$gport
store:
  kind: redis
  redis: { urls: ["redis://127.0.0.1:$rport"], key_prefix: "soak:" }
log: { level: warn }
scopes:
  - name: soak
    limits:
      - { name: per-user, per: identity, capacity: 20, refill_period: 10s }
      - { name: per-user-op, per: identity_operation, capacity: 5, refill_period: 1s }
      - { name: global, per: scope, capacity: 100000, refill_period: 1s }
YAML
"$target/release/tollgate" serve --config "$work/conf/tollgate.yaml" 2>"$work/tollgate.log" &
tpid=$!; pids+=($tpid)
until "$target/release/tollgate" allow --addr "http://127.0.0.1:$gport" --scope soak --identity probe >/dev/null 2>&1; do sleep 0.2; done

"$target/release/loadgen" --addr "http://127.0.0.1:$gport" --scope soak \
  --concurrency 20 --connections 2 --rate "$RATE" --identities "$IDENTITIES" \
  --requests 1000000000 --seconds "$DURATION" >"$work/loadgen.out" &
lpid=$!; pids+=($lpid)

printf '%8s %10s %14s %10s\n' "t (s)" "RSS (MB)" "Redis mem (MB)" "keys" | tee "$out/soak.txt"
samples=()
start=$(date +%s)
while kill -0 "$lpid" 2>/dev/null; do
  sleep "$EVERY"
  t=$(( $(date +%s) - start ))
  rss=$(awk '/VmRSS/ {print $2}' "/proc/$tpid/status")
  mem=$(redis-cli -p "$rport" info memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r')
  keys=$(redis-cli -p "$rport" dbsize)
  awk -v t="$t" -v r="$rss" -v m="$mem" -v k="$keys" \
    'BEGIN { printf "%8d %10.1f %14.2f %10d\n", t, r / 1024, m / 1048576, k }' | tee -a "$out/soak.txt"
  samples+=("{\"t\":$t,\"rss_kb\":$rss,\"redis_used_memory\":$mem,\"keys\":$keys}")
done
wait "$lpid" || true
summary=$(cat "$work/loadgen.out")
echo "$summary" | tee -a "$out/soak.txt"
errors=$(echo "$summary" | sed -n 's/.*errors=\([0-9]*\).*/\1/p')
redis_version=$(redis-server --version | sed 's/.*v=\([^ ]*\).*/\1/')
{
  echo "{\"duration_s\":$DURATION,\"rate\":$RATE,\"identities\":$IDENTITIES,\"redis\":\"$redis_version\","
  echo " \"machine\":\"$(nproc) cores, $(uname -sr)\",\"loadgen\":\"$summary\",\"errors\":${errors:-0},"
  echo " \"samples\":[$(IFS=,; echo "${samples[*]}")]}"
} >"$out/soak.json"
echo "soak: wrote $out/soak.json and $out/soak.txt" >&2

python3 - "$out/soak.json" "$SLACK_PERCENT" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); slack = float(sys.argv[2]) / 100
s = [x for x in d["samples"] if x["t"] >= 60]
ok = d["errors"] == 0
if len(s) >= 2:
    for k in ("rss_kb", "redis_used_memory"):
        first, last = s[0][k], s[-1][k]
        grew = (last - first) / first
        print(f"soak: {k} from {first} to {last} ({grew:+.1%})")
        ok &= grew <= slack
print("soak: PASS" if ok else "soak: FAIL")
sys.exit(0 if ok else 1)
PY
