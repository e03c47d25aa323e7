#!/usr/bin/env python3
"""Where a decision's CPU goes, by part, from `perf script` call stacks.

    python3 benches/ghz/profile_parts.py FREQ NAME=STACKS:DECISIONS ...
    python3 benches/ghz/profile_parts.py --redis FREQ NAME=STACKS:DECISIONS ...

benches/ghz/run.sh --profile calls it with the stacks of scenario (a) and
of the no-op handler (e), each recorded with `perf record -F FREQ
--call-graph dwarf` over a fixed number of calls. Each sample goes to the
first part below that has a frame in its stack, in this order, so a
syscall or a copy counts for the code that asked for it:

  Redis client   the coalescer and store (tollgate::store::redis) and the
                 redis crate;
  deciding       the rest of Tollgate's decision: tollgate::api, ::limiter,
                 ::store, ::observe (and the no-op handler's own code);
  gRPC           tonic's codec and service glue, prost, and the generated
                 service (tollgate::pb);
  service layers the tower and axum layers between the connection and the
                 service: routing, load shedding, concurrency and in-flight
                 bounds (tollgate::net), timeouts;
  HTTP/2         h2, hyper and tonic's transport (the connection task);
  the rest       the tokio runtime between tasks, and anything else.

The Redis client part is split once more, the same way: writing a call
(the writev syscall), reading replies, parsing them (the redis crate's
parser), waking tasks (tokio's scheduling, futex, eventfd), encoding a
call, and the rest of the coalescer.

With --redis, the stacks are redis-server's instead (recorded during (a)
and during plain SETs from 50 clients), and its parts are:

  running the script  EVALSHA: the Lua script and the commands it calls;
  expiry              deleting expired keys (activeExpireCycle);
  writing replies     writing to clients (writeToClient, writev), with
                      the loopback delivery the kernel does inside it;
  reading calls       reading and parsing calls, and the rest of running a
                      command other than EVALSHA (a SET, in the baseline);
  waiting for events  epoll_wait, going to sleep and waking up;
  the rest            Redis's timers and anything else, with kernel samples
                      whose user stack was lost (network interrupts).

Per part it prints microseconds of CPU per decision (samples / FREQ /
decisions) and the share of them spent in the kernel. Sampling gives
shares and rough sizes: read differences between servers in one run, not
single figures. Standard library only.
"""

import sys

PARTS = (
    ("Redis client", ("tollgate::store::redis", "redis::")),
    ("deciding", ("tollgate::api", "tollgate::limiter", "tollgate::store", "tollgate::observe",
                  "noop::", "tollgate_bench_tools")),
    ("gRPC (tonic, prost)", ("tonic::codec", "tonic::server", "tonic_prost", "prost::",
                             "tollgate::pb")),
    ("service layers (tower, axum, tollgate::net)", ("tower::", "axum::", "tollgate::net::",
                                                      "tollgate::server")),
    ("HTTP/2 (h2, hyper)", ("h2::", "hyper::", "hyper_util::", "tonic::transport")),
    ("the rest (runtime, other)", ("",)),
)

REDIS_PARTS = (
    ("writing a call", ("writev",)),
    ("reading replies", ("recvfrom", "__libc_recv", "poll_read_buf")),
    ("parsing replies", ("redis::parser", "combine::", "ValueCodec")),
    ("waking tasks", ("wake_by", "::schedule", "unpark", "futex", "eventfd")),
    ("encoding a call", ("script::encode", "Cmd::arg", "write_arg", "req_packed", "evalsha")),
    ("the rest of the coalescer", ("",)),
)

REDIS_SERVER_PARTS = (
    ("running the script", ("evalGenericCommand",)),
    ("expiry", ("activeExpireCycle",)),
    # writev's user frames are often lost in unwinding: its libc and kernel
    # frames name it.
    ("writing replies", ("writeToClient", "handleClientsWithPendingWrites", "__GI___writev",
                         "do_writev", "ksys_write")),
    ("reading calls", ("readQueryFromClient", "ksys_read")),
    ("waiting for events", ("epoll_wait", "aeApiPoll")),
    ("the rest", ("",)),
)


def samples(path):
    """Yields each sample as (frames, in_kernel), frames leaf first."""
    frames, kernel = [], False
    for line in open(path, errors="replace"):
        if not line.startswith("\t"):
            if frames:
                yield frames, kernel
            frames, kernel = [], False
            continue
        text = line.strip()
        if not frames:
            kernel = "[kernel.kallsyms]" in text
        frames.append(text)
    if frames:
        yield frames, kernel


def first(parts, frames):
    return next(name for name, marks in parts
                if any(m in f for f in frames for m in marks))


def parts_of(path, parts=PARTS):
    """Samples and kernel samples per part, then per part of the Redis
    client."""
    cpu = {name: [0, 0] for name, _ in parts + REDIS_PARTS}
    for frames, kernel in samples(path):
        part = first(parts, frames)
        counted = [part]
        if parts is PARTS and part == PARTS[0][0]:
            counted.append(first(REDIS_PARTS, frames))
        for p in counted:
            cpu[p][0] += 1
            cpu[p][1] += kernel
    return cpu


def table(title, parts, runs, freq, whole=PARTS):
    us = lambda n, d: n / freq * 1e6 / d
    print(f"\n{title}")
    print("| part | " + " | ".join(f"{name} µs | in kernel" for name, _, _ in runs) + " |")
    print("|---|" + "---|---|" * len(runs))
    for part in parts:
        cells = []
        for _, cpu, decisions in runs:
            if part == "all":
                n = sum(cpu[p][0] for p, _ in whole)
                k = sum(cpu[p][1] for p, _ in whole)
            else:
                n, k = cpu[part]
            cells.append(f"{us(n, decisions):.1f} | {k / n:.0%}" if n else "0.0 | –")
        print(f"| {part} | " + " | ".join(cells) + " |")


def main():
    args = sys.argv[1:]
    redis = args[:1] == ["--redis"]
    if redis:
        args = args[1:]
    freq = float(args[0])
    parts = REDIS_SERVER_PARTS if redis else PARTS
    runs = []
    for arg in args[1:]:
        name, rest = arg.split("=", 1)
        path, decisions = rest.rsplit(":", 1)
        runs.append((name, parts_of(path, parts), max(int(decisions), 1)))
    if redis:
        table(f"Redis CPU per decision (or per SET) by part (perf, {freq:.0f} Hz, dwarf call "
              "stacks; µs, and of it in the kernel)",
              [name for name, _ in parts] + ["all"], runs, freq, parts)
        return
    table(f"CPU per decision by part (perf, {freq:.0f} Hz, dwarf call stacks; µs, and of it in the kernel)",
          [name for name, _ in PARTS] + ["all"], runs, freq)
    redis_runs = [r for r in runs if r[1][PARTS[0][0]][0]]
    if redis_runs:
        table("Of the Redis client part", [name for name, _ in REDIS_PARTS], redis_runs, freq)


if __name__ == "__main__":
    main()
