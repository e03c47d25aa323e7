#!/usr/bin/env python3
"""What one charge costs Redis inside the decision script.

    python3 benches/redis/script_cost.py [--baseline OLD.lua] [--rounds 3]
    python3 benches/redis/script_cost.py --callgrind [--baseline OLD.lua]

Starts its own redis-server on a free loopback port (nothing else on it),
loads src/store/redis/decide.lua (and, with --baseline, another version of
it, e.g. `git show HEAD~1:src/store/redis/decide.lua > /tmp/old.lua`), and
sends EVALSHA batches of B one-bucket charges (capacity 1000, refill 1 s)
over 100,000 random keys, as scenario (a) of benches/ghz/run.sh does. Two
ways of sending:

  one at a time  the next call leaves when the last has answered, as the
                 coalescer sends them: every call pays Redis's event loop;
  pipelined      50 calls per write, which leaves mostly the script.

Per charge it prints the script's own time (`usec_per_call` from INFO
commandstats, divided by B) and Redis's whole CPU (from /proc/PID/schedstat,
in nanoseconds), the median of --rounds rounds, versions alternating within
a round.

--callgrind counts instructions instead, which do not depend on the
machine's load: redis-server runs under `valgrind --tool=callgrind` once per
version and workload, for 2,000 calls of 12 charges (24,000 charges) and,
to subtract start-up, for one call; it prints Redis's instructions per
charge, in all and running EVALSHA alone (the script and the commands it
calls, which leaves out Redis's timers and expiry, whose share depends on
the clock, and so moves less between runs). Three workloads, all sent one
call at a time:

  fresh            100,000 keys, capacity 1000, refill 1 s: nearly every
                   charge finds its bucket absent and makes it, as in (a);
  existing, taken  50 keys that never refill (capacity 10^6): each charge
                   reads its bucket and writes it back;
  existing, denied 50 keys of capacity 10 that never refill: after the
                   first ten per key, a charge reads and writes nothing;
  fresh, 4 buckets as fresh, each charge with four buckets (four keys), as
                   scenario (c) has.

--keep DIR (with --callgrind) keeps each profile of 2,000 calls as
DIR/<workload>.<version>.out: `callgrind_annotate --inclusive=yes` on one
shows where a charge's instructions go (Debian's Redis has no symbols for
Lua's internals, so some frames are addresses).

About a minute and a half with --baseline and --callgrind. Standard
library only; needs redis-server on PATH; --callgrind installs valgrind
from apt when it is missing.
"""

import argparse
import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CAP, PERIOD_US = 1000, 1_000_000
CHARGES = 48_000


def resp(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Conn:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _line(self):
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind in (b"+", b":"):
            return rest
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("redis closed the connection")
                self.buf += chunk
            data, self.buf = self.buf[:n], self.buf[n + 2 :]
            return data
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        raise RuntimeError(f"unexpected reply {line!r}")

    def call(self, *args):
        self.sock.sendall(resp(*args))
        return self.reply()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    # schedstat's first field is the time on CPU in nanoseconds: /proc/PID/stat
    # counts in 10 ms ticks, about 0.2 µs per charge over one round.
    return int(open(f"/proc/{pid}/schedstat").read().split()[0]) / 1e9


def usec_per_call(conn):
    for line in conn.call("INFO", "commandstats").decode().splitlines():
        if line.startswith("cmdstat_evalsha:"):
            return float(line.split("usec_per_call=")[1].split(",")[0])
    return 0.0


def evalsha(sha, batch, rng, keys=100_000, cap=CAP, period=PERIOD_US, buckets=1):
    """One EVALSHA's arguments: `batch` charges of cost 1 for distinct
    identities drawn from `keys`, each with `buckets` buckets (one key per
    bucket and identity). One-bucket charges go as scenario (a) sends them,
    with the flag Tollgate adds to such a batch (read it with one MGET)."""
    charge = struct.pack("<BH", 0, buckets) + struct.pack("<qqqq", cap, period, 1, 0) * buckets
    names = [f"bench:{{a}}:per-user:u{k}" for k in rng.sample(range(keys), batch)]
    if buckets > 1:
        names = [f"{name}:{j}" for name in names for j in range(buckets)]
    return ("EVALSHA", sha, len(names), *names, charge * batch,
            *(("1",) if buckets == 1 else ()))


def run(conn, pid, sha, batch, pipe, rng):
    conn.call("CONFIG", "RESETSTAT")
    calls = CHARGES // batch
    start = cpu_seconds(pid)
    sent = 0
    while sent < calls:
        n = min(pipe, calls - sent)
        conn.sock.sendall(b"".join(resp(*evalsha(sha, batch, rng)) for _ in range(n)))
        for _ in range(n):
            conn.reply()
        sent += n
    cpu = (cpu_seconds(pid) - start) * 1e6 / (calls * batch)
    return usec_per_call(conn) / batch, cpu


WORKLOADS = (
    # name, keys, capacity, period (µs), buckets per charge
    ("fresh", 100_000, CAP, PERIOD_US, 1),
    ("existing, taken", 50, 1_000_000, 10**12, 1),
    ("existing, denied", 50, 10, 10**12, 1),
    ("fresh, 4 buckets", 100_000, CAP, PERIOD_US, 4),
)
CG_BATCH, CG_CALLS = 12, 2000


def start_redis(work, port, wrap=()):
    redis = subprocess.Popen(
        [*wrap, "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", work],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Under valgrind, Redis takes seconds to open its port.
    for _ in range(600):
        try:
            return redis, Conn(port)
        except OSError:
            if redis.poll() is not None:
                sys.exit("redis-server exited before opening its port")
            time.sleep(0.05)
    redis.kill()
    sys.exit("redis-server never opened its port")


def instructions(text, keys, cap, period, buckets, calls, work, keep=None):
    """Redis's instructions (callgrind's Ir) from start to shutdown, having
    answered `calls` calls of CG_BATCH charges; the profile is copied to
    `keep` when given."""
    out = os.path.join(work, "callgrind.out")
    redis, conn = start_redis(
        work, free_port(), ("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"))
    try:
        sha = conn.call("SCRIPT", "LOAD", text).decode()
        rng = random.Random(1)
        for _ in range(calls):
            conn.call(*evalsha(sha, CG_BATCH, rng, keys, cap, period, buckets))
        try:
            conn.call("SHUTDOWN", "NOSAVE")
        except (ConnectionError, OSError):
            pass
        redis.wait(timeout=120)
    finally:
        if redis.poll() is None:
            redis.kill()
    total = None
    for line in open(out):
        if line.startswith(("summary:", "totals:")):
            total = int(line.split()[1])
    # The part spent running EVALSHA (the script and the commands it calls),
    # which leaves out what depends on the clock (Redis's timers, its
    # expiry deleting keys) and so moves less between runs.
    annotated = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", out],
                               capture_output=True, text=True, check=True).stdout
    in_eval = next((int(line.split()[0].replace(",", "")) for line in annotated.splitlines()
                    if ":evalGenericCommand " in line), None)
    if total is None or in_eval is None:
        sys.exit(f"no totals in {out}")
    if keep:
        shutil.copyfile(out, keep)
    return total, in_eval


def install_valgrind():
    """Installs valgrind from apt, as root or through sudo."""
    print("installing valgrind (apt)", file=sys.stderr)
    root = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(root + ["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(root + ["apt-get", "install", "-y", "-qq", "valgrind"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"--callgrind needs valgrind, and installing it failed: {e}")


def callgrind(scripts, keep=None):
    if not shutil.which("valgrind"):
        install_valgrind()
    work = tempfile.mkdtemp(prefix="tollgate-script-cost.")
    try:
        print(f"Redis instructions per charge (callgrind; {CG_CALLS} calls of "
              f"{CG_BATCH} charges, start-up and one call subtracted):")
        print()
        print("| workload | version | instructions per charge | of them, running EVALSHA |")
        print("|---|---|---|---|")
        for name, keys, cap, period, buckets in WORKLOADS:
            for version, text in scripts.items():
                one = instructions(text, keys, cap, period, buckets, 1, work)
                kept = None
                if keep:
                    kept = os.path.join(keep, f"{name.replace(', ', '-').replace(' ', '-')}.{version}.out")
                many = instructions(text, keys, cap, period, buckets, CG_CALLS + 1, work, kept)
                per = [(m - o) / (CG_CALLS * CG_BATCH) for m, o in zip(many, one)]
                print(f"| {name} | {version} | {per[0]:,.0f} | {per[1]:,.0f} |", flush=True)
    finally:
        subprocess.run(["rm", "-rf", work])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", help="another version of decide.lua to compare")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--callgrind", action="store_true",
                    help="count Redis's instructions per charge under callgrind")
    ap.add_argument("--keep", metavar="DIR",
                    help="with --callgrind, keep each workload's profile in DIR, "
                         "for callgrind_annotate")
    args = ap.parse_args()
    if args.keep and not args.callgrind:
        ap.error("--keep goes with --callgrind")
    # The store sends the pool functions in front of decide.lua; so does this.
    scripts = {"current": "".join(
        open(os.path.join(ROOT, "src/store/redis", name)).read()
        for name in ("lease_pool.lua", "decide.lua"))}
    if args.baseline:
        # A baseline from before lease_pool.lua existed runs as it is; a
        # newer one needs the same prefix (pass both files concatenated).
        scripts["baseline"] = open(args.baseline).read()
    if args.callgrind:
        if args.keep:
            os.makedirs(args.keep, exist_ok=True)
        callgrind(scripts, args.keep)
        return
    work = tempfile.mkdtemp(prefix="tollgate-script-cost.")
    redis, conn = start_redis(work, free_port())
    try:
        shas = {name: conn.call("SCRIPT", "LOAD", text).decode() for name, text in scripts.items()}
        rng = random.Random(1)
        print("| sending | charges per call | version | script µs per charge | Redis CPU µs per charge |")
        print("|---|---|---|---|---|")
        for pipe, how in ((1, "one at a time"), (50, "pipelined")):
            for batch in (1, 12):
                got = {name: [] for name in shas}
                for _ in range(args.rounds):
                    for name, sha in shas.items():
                        got[name].append(run(conn, redis.pid, sha, batch, pipe, rng))
                for name, runs in got.items():
                    mid = len(runs) // 2
                    script = sorted(r[0] for r in runs)[mid]
                    cpu = sorted(r[1] for r in runs)[mid]
                    print(f"| {how} | {batch} | {name} | {script:.2f} | {cpu:.2f} |")
    finally:
        redis.terminate()
        redis.wait()
        subprocess.run(["rm", "-rf", work])


if __name__ == "__main__":
    main()
