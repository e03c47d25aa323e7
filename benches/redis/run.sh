#!/usr/bin/env bash
# The Redis store's benchmark, in one command:
#
#   benches/redis/run.sh [RUNS]        (default 3 runs; medians reported)
#
# Builds Tollgate (release), starts a local standalone Redis
# (deploy/redis/start-topology.sh) and a Tollgate on it, then per run:
#   1. ghz drives tollgate.v1.RateLimiter/ShouldAllow (by reflection) at
#      CONCURRENCY callers for REQUESTS calls over IDENTITIES identities;
#   2. INFO commandstats gives Redis commands per decision;
#   3. redis-benchmark calls the same script by EVALSHA at the same
#      concurrency, over the same number of keys: the raw rate of the limit;
#   4. the same ghz load against a Tollgate on the embedded memory store:
#      the ceiling that the load generator and gRPC set on this machine;
#   5. Tollgate's own CPU time per decision (from /proc), which says what one
#      Tollgate core could serve once the load generator is not in the way.
# Prints decisions/s, p50, p99, commands per decision, and our throughput as
# a ratio of the raw EVALSHA rate. Loopback only; bounded in count and time.
# Needs redis-server, redis-cli, redis-benchmark, python3 and Go (for ghz).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

runs=${1:-3}
concurrency=${CONCURRENCY:-50}
requests=${REQUESTS:-50000}
identities=${IDENTITIES:-10000}
redis_port=${REDIS_PORT:-16479}
grpc_port=${GRPC_PORT:-16480}
work=$(mktemp -d -t tollgate-bench.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

ghz=$(command -v ghz || echo "$(go env GOPATH 2>/dev/null)/bin/ghz")
if [ ! -x "$ghz" ]; then
  echo "bench: installing ghz" >&2
  # Pinned: @latest resolves to an old release without template functions.
  go install github.com/bojand/ghz/cmd/ghz@v0.120.0
  ghz="$(go env GOPATH)/bin/ghz"
fi

echo "bench: building tollgate (release)" >&2
cargo build --release --quiet --bin tollgate --example loadgen

BASE_PORT=$redis_port deploy/redis/start-topology.sh standalone >"$work/topology.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q '^URLS=' "$work/topology.log" 2>/dev/null && break; sleep 0.1; done
url=$(sed -n 's/^URLS=//p' "$work/topology.log")
[ -n "$url" ] || { cat "$work/topology.log" >&2; exit 1; }
rcli() { redis-cli -p "$redis_port" "$@"; }

cat >"$work/tollgate.yaml" <<YAML
listen: 127.0.0.1:$grpc_port
log: { level: warn }
store:
  kind: redis
  redis:
    mode: standalone
    urls: ["$url"]
    key_prefix: "bench:"
    pool_size: 8
scopes:
  - name: bench
    limits:
      - { name: per-user, per: identity, capacity: 1000, refill_period: 1s }
YAML
sed -e "s/:$grpc_port/:$((grpc_port + 1))/" -e 's/kind: redis/kind: memory/' "$work/tollgate.yaml" >"$work/memory.yaml"
for config in tollgate memory; do
  target/release/tollgate serve --config "$work/$config.yaml" >"$work/$config.log" 2>&1 &
  pids+=($!)
done
tg_pid=${pids[1]}
# CPU seconds the Tollgate on Redis has used so far (user + system).
cpu() { awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) / hz }' "/proc/$tg_pid/stat"; }
for port in "$grpc_port" $((grpc_port + 1)); do
  for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
done
# LOADGEN=loadgen (default) drives the server with examples/loadgen.rs, which
# needs about a tenth of ghz's CPU: on two shared cores, ghz saturates before
# Tollgate does. LOADGEN=ghz measures with ghz itself.
loadgen=${LOADGEN:-loadgen}
load() {
  if [ "$loadgen" != ghz ]; then
    timeout 300 target/release/examples/loadgen --addr "http://127.0.0.1:$1" --scope bench \
      --concurrency "$concurrency" --requests "$requests" --identities "$identities" --seconds 120 --json
    return
  fi
  timeout 300 "$ghz" --insecure --call tollgate.v1.RateLimiter/ShouldAllow \
    -d "{\"scope\":\"bench\",\"identity\":\"user-{{mod .RequestNumber $identities}}\",\"operation\":\"op\"}" \
    -c "$concurrency" -n "$requests" -t 5s -O json "127.0.0.1:$1"
}

sha=$(rcli SCRIPT LOAD "$(cat src/store/redis/decide.lua)")
# The key the service uses for identity user-N: tg's schema, prefix bench:.
key='bench:{bench}:per-user:user-__rand_int__:*'

for run in $(seq "$runs"); do
  rcli CONFIG RESETSTAT >/dev/null
  cpu >"$work/cpu-$run.txt"
  load "$grpc_port" >"$work/ghz-$run.json"
  cpu >>"$work/cpu-$run.txt"
  rcli INFO commandstats >"$work/stats-$run.txt"
  timeout 120 redis-benchmark -p "$redis_port" -c "$concurrency" -n "$requests" -r "$identities" -q \
    EVALSHA "$sha" 1 "$key" 0 1000 1000000 1 0 >"$work/raw-$run.txt" 2>&1
  load $((grpc_port + 1)) >"$work/memory-$run.json"
  python3 - "$work" "$run" <<'PY'
import json, re, sys
work, run = sys.argv[1], sys.argv[2]
g = json.load(open(f"{work}/ghz-{run}.json"))
lat = {d["percentage"]: d["latency"] / 1e6 for d in g.get("latencyDistribution") or []}
ok = sum(v for k, v in g.get("statusCodeDistribution", {}).items() if k == "OK")
# Commandstats also counts what the script runs inside (TIME, GET, SET,
# DEL): those are not round trips. Everything else is a client's command.
calls = inner = 0
for line in open(f"{work}/stats-{run}.txt"):
    m = re.match(r"cmdstat_([\w|]+):calls=(\d+)", line)
    if not m or m.group(1).startswith(("info", "config")):
        continue
    if m.group(1) in ("time", "get", "set", "del"):
        inner += int(m.group(2))
    else:
        calls += int(m.group(2))
raw = open(f"{work}/raw-{run}.txt").read()
m = re.findall(r"([\d.]+) requests per second", raw)
raw_rps = float(m[-1]) if m else float("nan")
rps = g["rps"]
mem_rps = json.load(open(f"{work}/memory-{run}.json"))["rps"]
cpu0, cpu1 = (float(x) for x in open(f"{work}/cpu-{run}.txt").read().split())
us_per_decision = (cpu1 - cpu0) * 1e6 / max(ok, 1)
print(json.dumps({"run": int(run), "decisions_per_s": round(rps), "ok": ok, "count": g["count"],
                  "p50_ms": round(lat.get(50, float("nan")), 3), "p99_ms": round(lat.get(99, float("nan")), 3),
                  "redis_cmds_per_decision": round(calls / max(ok, 1), 3),
                  "script_inner_cmds_per_decision": round(inner / max(ok, 1), 3),
                  "raw_evalsha_per_s": round(raw_rps), "ratio": round(rps / raw_rps, 3),
                  "memory_store_per_s": round(mem_rps), "ratio_to_memory": round(rps / mem_rps, 3),
                  "tollgate_cpu_us_per_decision": round(us_per_decision, 1)}))
PY
done | tee "$work/results.jsonl"

python3 - "$work/results.jsonl" "$concurrency" "$requests" "$identities" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
med = lambda k: statistics.median(r[k] for r in rows)
print(f"\nmedians of {len(rows)} runs, concurrency {sys.argv[2]}, {sys.argv[3]} calls, {sys.argv[4]} identities:")
print(f"  decisions/s            {med('decisions_per_s'):.0f}")
print(f"  p50 / p99 latency      {med('p50_ms'):.2f} ms / {med('p99_ms'):.2f} ms")
print(f"  Redis cmds / decision  {med('redis_cmds_per_decision'):.3f}  (client commands; the script runs {med('script_inner_cmds_per_decision'):.2f} more inside)")
print(f"  raw EVALSHA/s          {med('raw_evalsha_per_s'):.0f}  (redis-benchmark, same script, same concurrency)")
print(f"  ratio                  {med('ratio'):.3f}")
print(f"  memory store, same load {med('memory_store_per_s'):.0f} decisions/s: Redis store at {med('ratio_to_memory'):.3f} of it")
us = med('tollgate_cpu_us_per_decision')
print(f"  Tollgate CPU/decision  {us:.1f} us, so one Tollgate core serves ~{1e6 / us:.0f} decisions/s "
      f"({1e6 / us / med('raw_evalsha_per_s'):.2f} of the raw EVALSHA rate)")
PY
