#!/usr/bin/env bash
# Tollgate under ghz, in one command: eleven scenarios, one table, one JSON.
#
#   benches/ghz/run.sh [--store memory|redis] [--quick] [--syscalls] [--profile] [--workers N]
#                      [--cores N] [--connections N] [--only a,b,...]
#
# Installs ghz when missing (pinned, into target/go-bin) while it builds
# release Tollgate and the no-op server (the `noop` binary of benches/tools),
# starts Redis (for --store redis) and a fresh Tollgate per scenario on
# loopback, and runs:
#   (a) many identities, mostly allowed: 100k identities, uniform;
#   (b) a hot key: one identity far over its limit;
#   (c) mixed: Zipf identities, 4 buckets per call (scope, identity,
#       operation, identity x operation), some denied;
#   (d) Envoy RLS, 2 descriptors per call;
#   (e) the no-op handler, as the ceiling;
#   (f) the hot key of (b) in a scope with a penalty box: banned after its
#       third denial, then answered from the ban cache;
#   (g) a lease acquire (tollgate.v1.Leases/Acquire): 100k identities, each
#       with a pool of 10 and leases that expire after 1 s, never released;
#   (h) a budget: 100k identities, each with a daily budget, mostly allowed.
#   (i) rates and a lease in one ShouldAllow (lease_id): 100k identities,
#       each with the rate of (a) and a pool of 10 leases expiring after
#       1 s, never released; one store step per decision.
#   (j) a lease release (tollgate.v1.Leases/Release) of a live lease: each
#       phase first acquires one lease per identity (not measured), then
#       releases them all, one per call.
# Each scenario runs at saturation (concurrency 50), then at a fixed rate of
# half the saturated rate, where latency is read. Per row: decisions/s, p50,
# p95, p99, errors, denied share (Tollgate's own counters), Redis script
# calls per decision (INFO commandstats), Tollgate and Redis CPU per decision
# (utime + stime from /proc, so they do not depend on the load tool), of
# Redis's the time spent running scripts (commandstats' usec), and
# Tollgate's peak RSS (VmHWM). Loopback only; every run is bounded in time;
# everything started here is stopped on exit. --quick: 4 s + 3 s of load per
# scenario, about 40 s in all once release Tollgate is built, and (j)'s
# acquires and releases about 15 s more.
# Each row also counts context switches per decision (every thread's
# voluntary + involuntary switches, from /proc/PID/task/*/status). Beside the
# table it prints ratios measured in this same run: each scenario's CPU per
# decision against the no-op handler's, and Redis CPU per decision against a
# plain SET from 50 clients (redis-benchmark, no pipelining, Redis's own
# utime + stime). --syscalls: after the table, scenarios (a) and (e) once
# more for a fixed 20,000 calls under `strace -c -f`, to count syscalls per
# decision by kind and writes per response (strace slows the server, which
# changes how calls batch: read these as counts, never as CPU).
# --profile: scenarios (a), (b) and (e) once more for a fixed 60,000 calls under
# `perf record --call-graph dwarf`, and a table of CPU per decision by part
# of the server (benches/ghz/profile_parts.py says which frames make each
# part); on Redis, the same for redis-server during (a) and during 200,000
# plain SETs, by part of Redis (running the script, reading calls, writing
# replies, expiry, waiting for events). strace and perf come from apt when
# missing (linux-perf), installed before any load runs. The `perf script`
# stacks are kept in OUT/profile/ (target/ghz/profile by default).
# --workers N: Tollgate and the no-op server both run N tokio workers
# (TOKIO_WORKER_THREADS; the default is one per core), to compare layouts in
# one run. --cores N: both run N single-threaded runtimes instead, one per
# thread, connections dealt to them in turn (Tollgate's `grpc.cores`).
# --connections N: ghz spreads its calls over N connections (default 1);
# with --cores, one connection would keep every call on one core.
# --only a,b: only these scenarios (and the no-op handler, (e), which every
# ratio needs), for a before/after of one path in more runs at once.
# Needs redis-server and redis-cli (for redis), python3, and Go (for ghz).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"

store=redis
cores=0
connections=1
only=a,b,c,d,f,g,h,i,j,k
quick=0
syscalls=0
profile=0
while [ $# -gt 0 ]; do
  case "$1" in
    --store) store=$2; shift 2 ;;
    --store=*) store=${1#--store=}; shift ;;
    --quick) quick=1; shift ;;
    --syscalls) syscalls=1; shift ;;
    --profile) profile=1; shift ;;
    --workers) export TOKIO_WORKER_THREADS=$2; shift 2 ;;
    --workers=*) export TOKIO_WORKER_THREADS=${1#--workers=}; shift ;;
    --cores) cores=$2; shift 2 ;;
    --cores=*) cores=${1#--cores=}; shift ;;
    --connections) connections=$2; shift 2 ;;
    --connections=*) connections=${1#--connections=}; shift ;;
    --only) only=$2; shift 2 ;;
    --only=*) only=${1#--only=}; shift ;;
    *) echo "usage: $0 [--store memory|redis] [--quick] [--syscalls] [--profile] [--workers N] [--cores N] [--connections N] [--only a,b,...]" >&2; exit 2 ;;
  esac
done
case "$store" in memory|redis) ;; *) echo "--store: memory or redis" >&2; exit 2 ;; esac
[[ "$only" =~ ^[abcdfghijk](,[abcdfghijk])*$ ]] || { echo "--only: scenario letters among a,b,c,d,f,g,h,i,j,k, comma-separated (e always runs)" >&2; exit 2; }
# wants KEY: whether scenario KEY is to run (--only).
wants() { [[ ",$only," == *",$1,"* ]]; }
if [ "$quick" = 1 ]; then sat=4s; half=3s; else sat=15s; half=10s; fi
concurrency=${CONCURRENCY:-50}
redis_port=${REDIS_PORT:-16579}
grpc_port=${GRPC_PORT:-16580}
metrics_port=$((grpc_port + 1))
noop_port=$((grpc_port + 2))
target=${CARGO_TARGET_DIR:-$root/target}
out=${OUT:-$target/ghz}
mkdir -p "$out"
work=$(mktemp -d -t tollgate-ghz.XXXXXX)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

# strace for --syscalls and perf for --profile, from apt when missing,
# before any load runs.
apt_tools=()
if [ "$syscalls" = 1 ] && ! command -v strace >/dev/null; then apt_tools+=(strace); fi
if [ "$profile" = 1 ] && ! command -v perf >/dev/null; then apt_tools+=(linux-perf); fi
if [ ${#apt_tools[@]} -gt 0 ]; then
  echo "ghz: installing ${apt_tools[*]} (apt)" >&2
  as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${apt_tools[@]}" >/dev/null
fi

ghz=$target/go-bin/ghz
# ghz builds while cargo does (a cold cargo build spends long stretches on
# one big crate at a time).
ghz_install=
if [ ! -x "$ghz" ]; then
  command -v go >/dev/null || { echo "ghz: Go is needed to install ghz" >&2; exit 1; }
  echo "ghz: installing ghz v0.120.0 into $target/go-bin" >&2
  GOBIN=$target/go-bin go install github.com/bojand/ghz/cmd/ghz@v0.120.0 &
  ghz_install=$!
  pids+=("$ghz_install")
fi
echo "ghz: building release tollgate and the no-op server" >&2
cargo build --release --quiet -p tollgate --bin tollgate -p tollgate-bench-tools --bin noop
if [ -n "$ghz_install" ]; then
  wait "$ghz_install" || { echo "ghz: go install failed" >&2; exit 1; }
  pids=() # reaped: its pid must not be signalled again at exit
fi
# Copies, so a later build into the same target dir cannot swap them mid-run.
bin=$work/bin
mkdir -p "$bin"
cp "$target/release/tollgate" "$target/release/noop" "$bin/"
# BENCH_TOLLGATE runs another build (an older commit's, for a before/after);
# not TOLLGATE_*, which Tollgate reads as config. Build that commit with its
# own CARGO_TARGET_DIR: one shared with this tree leaves its binary in
# target/release, and cargo may then take this tree's build as fresh.
# (A worktree of an older commit built into this target dir made every
# "after" run of one comparison measure the "before" binary.)
tollgate=${BENCH_TOLLGATE:-$bin/tollgate}

wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }
cpu_of() { awk -v hz="$(getconf CLK_TCK)" '{ print ($14 + $15) / hz }' "/proc/$1/stat"; }
# Calls answered OK in a ghz JSON report.
ok_of() { python3 -c 'import json, sys; print((json.load(open(sys.argv[1])).get("statusCodeDistribution") or {}).get("OK", 0))' "$1"; }
hwm_of() { awk '/VmHWM/ { print $2 }' "/proc/$1/status"; }
# Context switches of every thread of a process (threads that ended are lost,
# which is why the runtimes here keep theirs).
switches_of() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/^(non)?voluntary_ctxt_switches/ { s += $2 } END { print s + 0 }'; }

redis_pid=
if [ "$store" = redis ]; then
  redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$work" --logfile "$work/redis.log" &
  redis_pid=$!
  pids+=("$redis_pid")
  wait_port "$redis_port" || exit 1
fi
rcli() { redis-cli -p "$redis_port" "$@"; }

store_yaml="store: { kind: memory }"
[ "$store" = redis ] && store_yaml="store: { kind: redis, redis: { urls: [\"redis://127.0.0.1:$redis_port\"], key_prefix: \"bench:\" } }"
# The config in a directory of its own: Tollgate watches its config's
# directory for changes, and ghz's reports and strace's output, written
# into $work during the runs, would otherwise wake it on every write.
conf=$work/conf
mkdir -p "$conf"
cat >"$conf/envoy.yaml" <<YAML
domain: d
descriptors:
  - key: user
    rate_limit: { unit: second, requests_per_unit: 1000 }
  - key: remote_address
    rate_limit: { unit: second, requests_per_unit: 1000 }
YAML
cat >"$conf/tollgate.yaml" <<YAML
listen: 127.0.0.1:$grpc_port
log: { level: warn }
grpc: { cores: $cores }
metrics: { listen: 127.0.0.1:$metrics_port }
$store_yaml
envoy_ratelimit_configs: [envoy.yaml]
scopes:
  - name: a          # many identities, mostly allowed
    limits:
      - { name: per-user, per: identity, capacity: 1000, refill_period: 1s }
  - name: b          # one hot identity, far over its limit
    limits:
      - { name: per-user, per: identity, capacity: 10, refill_period: 1m }
  - name: c          # four buckets per call
    limits:
      - { name: per-scope, per: scope, capacity: 10000000, refill_period: 1s }
      - { name: per-user, per: identity, capacity: 20, refill_period: 1s }
      - { name: per-op, per: operation, capacity: 10000000, refill_period: 1s }
      - { name: per-user-op, per: identity_operation, capacity: 10, refill_period: 1s }
  - name: f          # (b) behind a penalty box: banned after 3 denials
    penalty: { strikes: 3, within: 1m, ban: 1h }
    limits:
      - { name: per-user, per: identity, capacity: 10, refill_period: 1m }
  - name: g          # a lease per call, expiring after 1 s
    limits:
      - { name: in-flight, per: identity, concurrency: 10, max_lease: 1s }
  - name: h          # a budget per identity
    limits:
      - { name: daily, per: identity, budget: 1000000, window: day }
  - name: i          # (a)'s rate and a lease per call, in one step
    limits:
      - { name: per-user, per: identity, capacity: 1000, refill_period: 1s }
      - { name: in-flight, per: identity, concurrency: 10, max_lease: 1s }
  - name: j          # leases acquired, then released
    limits:
      - { name: in-flight, per: identity, concurrency: 10, max_lease: 1h }
  - name: k          # shaping: 100 identities asking about twice their rate
    limits:
      - { name: per-user, per: identity, capacity: 5, refill_period: 100ms, max_delay: 200ms }
YAML
# (c): Zipf(1.1) over 100k identities, 4 operations; ghz cycles the list.
python3 - "$work/zipf.json" <<'PY'
import json, random, sys
random.seed(1)
n, s = 100_000, 1.1
weights = [1 / (k ** s) for k in range(1, n + 1)]
ids = random.choices(range(n), weights=weights, k=50_000)
ops = ["tools/call:search", "tools/call:fetch", "tools/list", "resources/read"]
json.dump([{"scope": "c", "identity": f"u{i}", "operation": ops[j % 4]}
           for j, i in enumerate(ids)], open(sys.argv[1], "w"))
PY

denied_total() { curl -s "127.0.0.1:$metrics_port/metrics" | awk '/^tollgate_decisions_total/ && /result="(denied|banned)"/ { s += $NF } END { print s + 0 }'; }
evalsha_calls() { [ -n "$redis_pid" ] && rcli INFO commandstats | sed -n 's/^cmdstat_evalsha:calls=\([0-9]*\).*/\1/p' | grep . || echo 0; }
# Microseconds Redis has spent running EVALSHA (the scripts and the commands
# they call), from INFO commandstats.
evalsha_usec() { [ -n "$redis_pid" ] && rcli INFO commandstats | sed -n 's/^cmdstat_evalsha:calls=[0-9]*,usec=\([0-9]*\).*/\1/p' | grep . || echo 0; }

# run NAME PID ARGS...: one ghz run with CPU, calls and denials around it.
run() {
  local name=$1 pid=$2; shift 2
  local c0 r0=0 e0 d0=0 c1 r1=0 e1 d1=0 s0 s1 u0 u1
  c0=$(cpu_of "$pid"); e0=$(evalsha_calls); u0=$(evalsha_usec); s0=$(switches_of "$pid")
  [ -n "$redis_pid" ] && r0=$(cpu_of "$redis_pid")
  [ "$pid" != "$noop_pid" ] && d0=$(denied_total)
  timeout 120 "$ghz" --insecure -c "$concurrency" --connections "$connections" --duration-stop=wait -O json "$@" >"$work/$name.json" 2>"$work/$name.err" || true
  c1=$(cpu_of "$pid"); e1=$(evalsha_calls); u1=$(evalsha_usec); s1=$(switches_of "$pid")
  [ -n "$redis_pid" ] && r1=$(cpu_of "$redis_pid")
  [ "$pid" != "$noop_pid" ] && d1=$(denied_total)
  echo "{\"name\":\"$name\",\"tg_cpu\":$(awk "BEGIN { print $c1 - $c0 }"),\"redis_cpu\":$(awk "BEGIN { print $r1 - $r0 }"),\"evalsha\":$((e1 - e0)),\"evalsha_usec\":$((u1 - u0)),\"denied\":$((d1 - d0)),\"rss_kb\":$(hwm_of "$pid"),\"switches\":$((s1 - s0))}" >"$work/$name.meta"
}

scenario() {
  local key=$1 call=$2 target_pid=$3; shift 3
  local rps
  run "$key-sat" "$target_pid" --call "$call" -z "$sat" "$@" "127.0.0.1:$port"
  rps=$(python3 -c "import json; print(max(1, int(json.load(open('$work/$key-sat.json'))['rps'] / 2)))")
  run "$key-half" "$target_pid" --call "$call" -z "$half" --rps "$rps" "$@" "127.0.0.1:$port"
}

start_tollgate() {
  [ -n "$redis_pid" ] && rcli FLUSHALL >/dev/null
  "$tollgate" serve --config "$conf/tollgate.yaml" >"$work/tollgate-$1.log" 2>&1 &
  tg_pid=$!
  pids+=("$tg_pid")
  wait_port "$grpc_port" || { cat "$work/tollgate-$1.log" >&2; exit 1; }
  # One call by reflection first, so connections and the script are warm.
  "$ghz" --insecure -n 20 -c 2 --call tollgate.v1.RateLimiter/ShouldAllow -d '{"scope":"warm","identity":"w"}' "127.0.0.1:$grpc_port" >/dev/null 2>&1 || true
}
stop_tollgate() { kill "$tg_pid"; wait "$tg_pid" 2>/dev/null || true; }

noop_pid=none
port=$grpc_port
# one KEY LABEL CALL ARGS...: scenario KEY against a fresh Tollgate, unless
# --only leaves it out.
one() {
  local key=$1 label=$2 call=$3; shift 3
  wants "$key" || return 0
  echo "ghz: ($key) $label" >&2
  start_tollgate "$key"
  scenario "$key" "$call" "$tg_pid" "$@"
  stop_tollgate
}
one a "many identities" tollgate.v1.RateLimiter/ShouldAllow \
  -d '{"scope":"a","identity":"user-{{randomInt 0 100000}}","operation":"op"}'
one b "hot key" tollgate.v1.RateLimiter/ShouldAllow \
  -d '{"scope":"b","identity":"hot","operation":"op"}'
one c "mixed, 4 buckets" tollgate.v1.RateLimiter/ShouldAllow --data-file "$work/zipf.json"
one d "Envoy RLS" envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit \
  --proto benches/ghz/rls.proto \
  -d '{"domain":"d","descriptors":[{"entries":[{"key":"user","value":"u{{randomInt 0 100000}}"}]},{"entries":[{"key":"remote_address","value":"10.{{randomInt 0 250}}.{{randomInt 0 250}}.1"}]}]}'
one f "hot key, banned" tollgate.v1.RateLimiter/ShouldAllow \
  -d '{"scope":"f","identity":"hot","operation":"op"}'
one g "lease acquire" tollgate.v1.Leases/Acquire \
  -d '{"target":{"scope":"g","identity":"user-{{randomInt 0 100000}}","lease_id":"{{newUUID}}"}}'
one h "budget" tollgate.v1.RateLimiter/ShouldAllow \
  -d '{"scope":"h","identity":"user-{{randomInt 0 100000}}","operation":"op"}'
one i "rates and a lease" tollgate.v1.RateLimiter/ShouldAllow \
  -d '{"scope":"i","identity":"user-{{randomInt 0 100000}}","operation":"op","lease_id":"{{newUUID}}"}'
one k "shaped" tollgate.v1.RateLimiter/ShouldAllow \
  -d '{"scope":"k","identity":"user-{{randomInt 0 100}}","operation":"op","max_wait":"1s"}'
if wants j; then
  echo "ghz: (j) lease release" >&2
  # Each phase releases leases acquired just before it, one identity and one
  # lease per call number, so every release finds its lease live.
  release_phase() {
    local phase=$1 n=$2; shift 2
    local lease='{"target":{"scope":"j","identity":"'"$phase"'-{{.RequestNumber}}","lease_id":"l-{{.RequestNumber}}"}}'
    timeout 120 "$ghz" --insecure -c "$concurrency" --connections "$connections" -n "$n" -O json --call tollgate.v1.Leases/Acquire \
      -d "$lease" "127.0.0.1:$grpc_port" >"$work/j-$phase-acquire.json" 2>"$work/j-$phase-acquire.err" || true
    local ok
    ok=$(ok_of "$work/j-$phase-acquire.json")
    [ "$ok" = "$n" ] || echo "ghz: (j) $phase: only $ok of $n acquires answered OK" >&2
    run "j-$phase" "$tg_pid" --call tollgate.v1.Leases/Release -n "$n" "$@" -d "$lease" "127.0.0.1:$grpc_port"
  }
  start_tollgate j
  if [ "$quick" = 1 ]; then n_release=30000; else n_release=100000; fi
  release_phase sat "$n_release"
  rps=$(python3 -c "import json; print(max(1, int(json.load(open('$work/j-sat.json'))['rps'] / 2)))")
  release_phase half $((n_release / 2)) --rps "$rps"
  stop_tollgate
fi
echo "ghz: (e) no-op handler" >&2
"$bin/noop" --listen "127.0.0.1:$noop_port" --cores "$cores" >"$work/noop.log" 2>&1 &
noop_pid=$!
pids+=("$noop_pid")
wait_port "$noop_port" || exit 1
port=$noop_port
saved_redis=$redis_pid
redis_pid=
scenario e tollgate.v1.RateLimiter/ShouldAllow "$noop_pid" \
  -d '{"scope":"a","identity":"user-{{randomInt 0 100000}}","operation":"op"}'
redis_pid=$saved_redis

# A plain SET from 50 clients, no pipelining: what Redis spends on the
# cheapest write, against which a decision's Redis CPU is read.
if [ -n "$redis_pid" ]; then
  echo "ghz: Redis SET baseline (redis-benchmark, 50 clients)" >&2
  n_set=$([ "$quick" = 1 ] && echo 50000 || echo 200000)
  rcli FLUSHALL >/dev/null
  r0=$(cpu_of "$redis_pid")
  redis-benchmark -p "$redis_port" -c 50 -n "$n_set" -t set -P 1 -q >"$work/set.txt" 2>&1
  r1=$(cpu_of "$redis_pid")
  echo "{\"calls\":$n_set,\"redis_cpu\":$(awk "BEGIN { print $r1 - $r0 }")}" >"$work/set.meta"
fi

# strace_run NAME PID ARGS...: a fixed 20,000 calls with every thread of PID
# under `strace -c -f`, counting syscalls by kind; then 20,000 more with only
# the writes traced and each descriptor named (`-yy`), to tell writes to the
# gRPC callers from writes to Redis and the runtime's eventfd wake-ups.
strace_run() {
  local name=$1 pid=$2; shift 2
  strace -c -f -qq -o "$work/$name.strace" -p "$pid" &
  local st=$!
  sleep 1 # strace attaches to every thread before the load starts
  timeout 120 "$ghz" --insecure -c "$concurrency" --connections "$connections" -n 20000 -O json "$@" >"$work/$name.json" 2>"$work/$name.err" || true
  kill -INT "$st"; wait "$st" 2>/dev/null || true
  strace -f -qq -yy -s 0 -e trace=write,writev,sendto,sendmsg -o "$work/$name.writes" -p "$pid" &
  st=$!
  sleep 1
  timeout 120 "$ghz" --insecure -c "$concurrency" --connections "$connections" -n 20000 -O json "$@" >"$work/$name-writes.json" 2>>"$work/$name.err" || true
  kill -INT "$st"; wait "$st" 2>/dev/null || true
}
# profile_run NAME PID ARGS...: a fixed 60,000 calls with PID under `perf
# record` (499 Hz, call stacks unwound from a copy of each sample's stack),
# its stacks written out for profile_parts.py.
# During (a) on Redis, redis-server is recorded the same way, as redis-a-perf.
profile_run() {
  local name=$1 pid=$2; shift 2
  perf record -q -F 499 --call-graph dwarf,16384 -o "$work/$name.data" -p "$pid" >/dev/null 2>&1 &
  local pf=$! rf=
  if [ "$name" = a-perf ] && [ -n "$redis_pid" ]; then
    perf record -q -F 499 --call-graph dwarf,16384 -o "$work/redis-$name.data" -p "$redis_pid" >/dev/null 2>&1 &
    rf=$!
  fi
  sleep 1
  timeout 120 "$ghz" --insecure -c "$concurrency" --connections "$connections" -n 60000 -O json "$@" >"$work/$name.json" 2>"$work/$name.err" || true
  kill -INT "$pf" $rf; wait "$pf" $rf 2>/dev/null || true
  perf script -i "$work/$name.data" --no-inline -F ip,sym,dso >"$work/$name.stacks" 2>/dev/null
  [ -z "$rf" ] || perf script -i "$work/redis-$name.data" --no-inline -F ip,sym,dso >"$work/redis-$name.stacks" 2>/dev/null
}
# profile_set: Redis recorded the same way while it answers 200,000 plain
# SETs from 50 clients, as the baseline's, for the table of Redis's parts.
profile_set() {
  rcli FLUSHALL >/dev/null
  perf record -q -F 499 --call-graph dwarf,16384 -o "$work/redis-set-perf.data" -p "$redis_pid" >/dev/null 2>&1 &
  local rf=$!
  sleep 1
  redis-benchmark -p "$redis_port" -c 50 -n 200000 -t set -P 1 -q >/dev/null 2>&1
  kill -INT "$rf"; wait "$rf" 2>/dev/null || true
  perf script -i "$work/redis-set-perf.data" --no-inline -F ip,sym,dso >"$work/redis-set-perf.stacks" 2>/dev/null
}
# on_a_and_e RUN SUFFIX: RUN (strace_run or profile_run) over the no-op
# handler with (a)'s calls, as e-SUFFIX, then over a fresh Tollgate, as
# a-SUFFIX.
on_a_and_e() {
  local run=$1 suffix=$2
  local call=(--call tollgate.v1.RateLimiter/ShouldAllow
    -d '{"scope":"a","identity":"user-{{randomInt 0 100000}}","operation":"op"}')
  "$run" "e-$suffix" "$noop_pid" "${call[@]}" "127.0.0.1:$noop_port"
  port=$grpc_port
  start_tollgate "a-$suffix"
  "$run" "a-$suffix" "$tg_pid" "${call[@]}" "127.0.0.1:$grpc_port"
  stop_tollgate
}
if [ "$syscalls" = 1 ]; then
  echo "ghz: syscalls per decision, (a) and (e), under strace" >&2
  on_a_and_e strace_run strace
fi
if [ "$profile" = 1 ]; then
  echo "ghz: CPU by part, (a), (b) and (e), under perf" >&2
  on_a_and_e profile_run perf
  start_tollgate b-perf
  profile_run b-perf "$tg_pid" --call tollgate.v1.RateLimiter/ShouldAllow \
    -d '{"scope":"b","identity":"hot","operation":"op"}' "127.0.0.1:$grpc_port"
  stop_tollgate
  [ -z "$redis_pid" ] || profile_set
fi

RUN_CORES=$cores RUN_CONNECTIONS=$connections \
python3 - "$work" "$out" "$store" "$quick" "$concurrency" "$redis_port" "$grpc_port" "$noop_port" <<'PY'
import json, os, platform, re, subprocess, sys
work, out, store, quick, conc, redis_port, *grpc_ports = sys.argv[1:]
names = {"a": "(a) many identities", "b": "(b) hot key", "c": "(c) mixed, 4 buckets",
         "d": "(d) Envoy RLS, 2 descr.", "e": "(e) no-op handler",
         "f": "(f) hot key, banned", "g": "(g) lease acquire", "h": "(h) budget",
         "i": "(i) rates + lease", "j": "(j) lease release", "k": "(k) shaped"}
rows = []
# The scenarios that ran (--only), and (e) always.
ran = [key for key in "abcdefghijk" if os.path.exists(f"{work}/{key}-sat.json")]
for key in ran:
    for phase in ("sat", "half"):
        g = json.load(open(f"{work}/{key}-{phase}.json"))
        m = json.load(open(f"{work}/{key}-{phase}.meta"))
        lat = {d["percentage"]: d["latency"] / 1e6 for d in g.get("latencyDistribution") or []}
        codes = g.get("statusCodeDistribution") or {}
        ok = codes.get("OK", 0)
        n = max(ok, 1)
        rows.append({
            "scenario": names[key], "phase": "saturation" if phase == "sat" else "half rate",
            "decisions_per_s": round(g["rps"]), "p50_ms": lat.get(50), "p95_ms": lat.get(95),
            "p99_ms": lat.get(99), "errors": g["count"] - ok, "ok": ok,
            "denied_share": round(m["denied"] / n, 3) if key != "e" else None,
            "redis_calls_per_decision": round(m["evalsha"] / n, 4) if store == "redis" and key != "e" else None,
            "tollgate_cpu_us": round(m["tg_cpu"] * 1e6 / n, 1),
            "redis_cpu_us": round(m["redis_cpu"] * 1e6 / n, 2) if store == "redis" and key != "e" else None,
            # Of Redis's CPU, the part running the scripts (commandstats).
            "redis_script_us": round(m.get("evalsha_usec", 0) / n, 2) if store == "redis" and key != "e" else None,
            "peak_rss_mb": round(m["rss_kb"] / 1024, 1),
            "switches_per_decision": round(m["switches"] / n, 2),
        })
machine = {
    "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
    "cores": os.cpu_count(), "kernel": platform.release(),
    "redis": subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.strip() if store == "redis" else None,
    "store": store, "quick": quick == "1", "concurrency": int(conc),
    "workers": int(os.environ["TOKIO_WORKER_THREADS"]) if os.environ.get("TOKIO_WORKER_THREADS") else os.cpu_count(),
    # 0: one multi-threaded runtime of `workers`; N: N single-threaded ones.
    "runtimes_per_core": int(os.environ["RUN_CORES"]),
    "connections": int(os.environ["RUN_CONNECTIONS"]),
}
def row(scenario, phase="saturation"):
    return next(r for r in rows if r["scenario"] == names[scenario] and r["phase"] == phase)
noop = row("e")
ratios = []
for key in (k for k in "abcdfghijk" if k in ran):
    r = row(key)
    ratios.append({"what": f"{names[key]}: Tollgate CPU per decision", "against": "no-op handler's CPU per call",
                   "ratio": round(r["tollgate_cpu_us"] / noop["tollgate_cpu_us"], 2)})
if os.path.exists(f"{work}/set.meta"):
    sm = json.load(open(f"{work}/set.meta"))
    set_us = sm["redis_cpu"] * 1e6 / sm["calls"]
    for key in (k for k in "acdghijk" if k in ran):
        r = row(key)
        ratios.append({"what": f"{names[key]}: Redis CPU per decision", "against": f"a plain SET's ({set_us:.1f} µs, 50 clients)",
                       "ratio": round(r["redis_cpu_us"] / set_us, 2)})
def strace_counts(name):
    path = f"{work}/{name}.strace"
    if not os.path.exists(path):
        return None
    g = json.load(open(f"{work}/{name}.json"))
    n = max((g.get("statusCodeDistribution") or {}).get("OK", 0), 1)
    calls = {}
    for line in open(path):
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            calls[parts[-1]] = int(parts[3])
    writes = sum(calls.get(k, 0) for k in ("write", "writev", "sendto", "sendmsg", "sendmmsg"))
    return {"calls": n, "writes_per_response": round(writes / n, 3),
            "writes_by_target": writes_by_target(name),
            "per_decision": {k: round(v / n, 3) for k, v in sorted(calls.items(), key=lambda kv: -kv[1])}}
def writes_by_target(name):
    """Writes per decision from the `-yy` pass, by what they were written to."""
    path, gpath = f"{work}/{name}.writes", f"{work}/{name}-writes.json"
    if not (os.path.exists(path) and os.path.exists(gpath)):
        return None
    g = json.load(open(gpath))
    n = max((g.get("statusCodeDistribution") or {}).get("OK", 0), 1)
    kinds = {"callers": 0, "redis": 0, "eventfd": 0, "other": 0}
    # A descriptor prints as `23<TCP:[127.0.0.1:16580->127.0.0.1:41234]>`:
    # its name may hold a `>` of its own, so it ends at `>` before `,`.
    call = re.compile(r"^\d+\s+(write|writev|sendto|sendmsg)\(\d+<(.*?)>,")
    for line in open(path):
        m = call.match(line)
        if not m:
            continue  # a "resumed" line: its call was counted where it began
        target = m.group(2)
        if "eventfd" in target:
            kinds["eventfd"] += 1
        elif f"->127.0.0.1:{redis_port}]" in target:
            kinds["redis"] += 1
        elif f"127.0.0.1:{grpc_ports[0]}->" in target or f"127.0.0.1:{grpc_ports[1]}->" in target:
            kinds["callers"] += 1
        else:
            kinds["other"] += 1
    return {k: round(v / n, 3) for k, v in kinds.items()}
syscalls = {k: v for k, v in (("a", strace_counts("a-strace")), ("e", strace_counts("e-strace"))) if v}
json.dump({"machine": machine, "rows": rows, "ratios": ratios, "syscalls": syscalls},
          open(f"{out}/ghz-{store}.json", "w"), indent=1)
f = lambda v, d=2: "–" if v is None else f"{v:.{d}f}"
denied = lambda r: "–" if r["denied_share"] is None else f"{r['denied_share']:.1%}"
layout = f"{machine['runtimes_per_core']} single-threaded runtimes" if machine["runtimes_per_core"] else f"{machine['workers']} tokio workers"
print(f"\nstore: {store}, concurrency {conc}, {machine['cores']} cores ({machine['cpu']}), {layout}, {machine['connections']} connection(s), {'quick' if quick == '1' else 'full'} run")
print("\n| ratio, this run | against | ratio |")
print("|---|---|---|")
for q in ratios:
    print(f"| {q['what']} | {q['against']} | {q['ratio']:.2f}× |")
print()
print("| scenario | phase | decisions/s | p50 ms | p95 ms | p99 ms | errors | denied | Redis calls/decision | Tollgate CPU µs/decision | Redis CPU µs/decision | of it in scripts µs | peak RSS MB | switches/decision |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['scenario']} | {r['phase']} | {r['decisions_per_s']} | {f(r['p50_ms'])} | {f(r['p95_ms'])} | {f(r['p99_ms'])} | "
          f"{r['errors']} | {denied(r)} | "
          f"{f(r['redis_calls_per_decision'], 3)} | {f(r['tollgate_cpu_us'], 1)} | {f(r['redis_cpu_us'], 1)} | {f(r['redis_script_us'], 1)} | {f(r['peak_rss_mb'], 1)} | "
          f"{f(r['switches_per_decision'], 2)} |")
if syscalls:
    kinds = []
    for v in syscalls.values():
        kinds += [k for k in v["per_decision"] if k not in kinds]
    kinds = kinds[:10]
    heads = [names[k] for k in syscalls]
    print(f"\nsyscalls per decision under strace -c -f, 20,000 calls (counts, not CPU)")
    print("| syscall | " + " | ".join(heads) + " |")
    print("|---|" + "---|" * len(heads))
    print("| writes per response | " + " | ".join(f"{v['writes_per_response']:.3f}" for v in syscalls.values()) + " |")
    for kind, label in (("callers", "of them, to gRPC callers"), ("redis", "to Redis"), ("eventfd", "to an eventfd (a worker woken)"), ("other", "to anything else")):
        if all(v.get("writes_by_target") for v in syscalls.values()):
            print(f"| {label} (`-yy` pass) | " + " | ".join(f"{v['writes_by_target'][kind]:.3f}" for v in syscalls.values()) + " |")
    for k in kinds:
        print(f"| {k} | " + " | ".join(f"{v['per_decision'].get(k, 0):.3f}" for v in syscalls.values()) + " |")
print(f"\nJSON: {out}/ghz-{store}.json")
PY
if [ "$profile" = 1 ]; then
  python3 "$root/benches/ghz/profile_parts.py" 499 \
    "(a)=$work/a-perf.stacks:$(ok_of "$work/a-perf.json")" \
    "(b)=$work/b-perf.stacks:$(ok_of "$work/b-perf.json")" \
    "(e) no-op=$work/e-perf.stacks:$(ok_of "$work/e-perf.json")"
  if [ -n "$redis_pid" ]; then
    python3 "$root/benches/ghz/profile_parts.py" --redis 499 \
      "(a)=$work/redis-a-perf.stacks:$(ok_of "$work/a-perf.json")" \
      "plain SET=$work/redis-set-perf.stacks:200000"
  fi
  # The stacks stay, for questions the tables do not answer (which lock a
  # worker waited on, what a part is made of).
  rm -rf "$out/profile"
  mkdir -p "$out/profile"
  cp "$work"/*.stacks "$out/profile/"
  echo "stacks: $out/profile/" >&2
fi
