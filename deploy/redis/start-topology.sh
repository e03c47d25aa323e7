#!/usr/bin/env bash
# Starts a local Redis topology on loopback, for trying Tollgate's Redis store
# and for the benchmarks:
#
#   deploy/redis/start-topology.sh standalone|sentinel|cluster
#
#   standalone  one redis-server
#   sentinel    one primary, one replica, three sentinels (master: mymaster)
#   cluster     three primaries, every slot assigned
#
# Prints the store.redis settings to use (mode, urls, master_name) and a
# machine-readable `URLS=...` line, then stays in the foreground until
# interrupted (Ctrl-C or SIGTERM), when it stops every process and removes
# its temp dir. Ports start at BASE_PORT (default 16379); nothing listens
# beyond 127.0.0.1. Needs redis-server, redis-sentinel and redis-cli
# (scripts/install-test-deps.sh installs them).
set -euo pipefail

mode=${1:-}
base=${BASE_PORT:-16379}
case "$mode" in
  standalone | sentinel | cluster) ;;
  *)
    echo "usage: $0 standalone|sentinel|cluster" >&2
    exit 2
    ;;
esac

dir=$(mktemp -d -t tollgate-redis.XXXXXX)
pids=()
stop() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$dir"
  echo "stopped $mode topology" >&2
}
trap stop EXIT
trap 'exit 0' INT TERM

# server PORT [ARGS...]: starts redis-server in its own dir and waits for it.
server() {
  local port=$1
  shift
  mkdir -p "$dir/$port"
  (cd "$dir/$port" && exec redis-server --port "$port" --bind 127.0.0.1 \
    --save '' --appendonly no "$@" >"$dir/$port/log" 2>&1) &
  pids+=($!)
  ready "$port"
}

ready() {
  for _ in $(seq 100); do
    redis-cli -p "$1" ping >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "redis on port $1 did not start; see $dir/$1/log" >&2
  exit 1
}

case "$mode" in
  standalone)
    server "$base"
    urls="redis://127.0.0.1:$base"
    ;;
  sentinel)
    server "$base"
    server $((base + 1)) --replicaof 127.0.0.1 "$base"
    urls=""
    for i in 0 1 2; do
      port=$((base + 100 + i))
      mkdir -p "$dir/$port"
      cat >"$dir/$port/sentinel.conf" <<CONF
port $port
bind 127.0.0.1
sentinel monitor mymaster 127.0.0.1 $base 2
sentinel down-after-milliseconds mymaster 1000
sentinel failover-timeout mymaster 3000
CONF
      (cd "$dir/$port" && exec redis-sentinel "$dir/$port/sentinel.conf" >"$dir/$port/log" 2>&1) &
      pids+=($!)
      ready "$port"
      urls="$urls${urls:+,}redis://127.0.0.1:$port"
    done
    ;;
  cluster)
    nodes=()
    urls=""
    for i in 0 1 2; do
      port=$((base + i))
      server "$port" --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000
      nodes+=("127.0.0.1:$port")
      urls="$urls${urls:+,}redis://127.0.0.1:$port"
    done
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
    for _ in $(seq 100); do
      redis-cli -p "$base" cluster info | grep -q cluster_state:ok && break
      sleep 0.1
    done
    ;;
esac

echo "$mode topology up in $dir"
echo "store:"
echo "  kind: redis"
echo "  redis:"
echo "    mode: $mode"
echo "    urls: [${urls//,/, }]"
[ "$mode" = sentinel ] && echo "    master_name: mymaster"
echo "URLS=$urls"
wait
