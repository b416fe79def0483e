"""Python's multiprocessing on the synchronization workloads of tests/benches/sync.rs.

`python3 -I -S sync_bench.py METHOD LOCKS ROUND_TRIPS PROCESSES INCREMENTS RUNS [ping_pong]`
prints (with `ping_pong`, only that workload)
`name <seconds>` lines: `lock` (one uncontended acquire and release of a `Lock`), `ping_pong`
(one round trip of two `Event`s between this process and a child), `counter` (PROCESSES
children each adding 1 to a `Value('q')` INCREMENTS times under its lock, from a go signal to
the last join), each the median of RUNS after a warm-up.
"""

import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import median_time  # noqa: E402


def pong(ping, pong_, round_trips):
    for _ in range(round_trips):
        ping.wait()
        ping.clear()
        pong_.set()


def count(value, ready, go, increments):
    ready.release()
    go.wait()
    for _ in range(increments):
        with value.get_lock():
            value.value += 1


def main():
    method = sys.argv[1]
    locks, round_trips, processes, increments, runs = (int(a) for a in sys.argv[2:7])
    only_ping_pong = sys.argv[7:] == ["ping_pong"]
    ctx = mp.get_context(method)

    lock = ctx.Lock()

    def lock_loop():
        for _ in range(locks):
            lock.acquire()
            lock.release()

    if not only_ping_pong:
        print(f"lock {median_time(runs, lock_loop) / locks}")

    def ping_pong():
        ping, pong_ = ctx.Event(), ctx.Event()
        child = ctx.Process(target=pong, args=(ping, pong_, round_trips))
        child.start()
        # The child's start is not timed: a first round trip waits for it.
        started = None
        for i in range(round_trips):
            if i == 1:
                started = time.perf_counter()
            ping.set()
            pong_.wait()
            pong_.clear()
        took = time.perf_counter() - started
        child.join()
        return took

    times = sorted(ping_pong() for _ in range(runs))
    print(f"ping_pong {times[len(times) // 2] / (round_trips - 1)}")
    if only_ping_pong:
        return

    def counter():
        value, ready, go = ctx.Value("q", 0), ctx.Semaphore(0), ctx.Event()
        children = [
            ctx.Process(target=count, args=(value, ready, go, increments)) for _ in range(processes)
        ]
        for child in children:
            child.start()
        for _ in children:
            ready.acquire()
        started = time.perf_counter()
        go.set()
        for child in children:
            child.join()
        took = time.perf_counter() - started
        assert value.value == processes * increments, value.value
        return took

    counter()
    times = sorted(counter() for _ in range(runs))
    print(f"counter {times[len(times) // 2]}")


if __name__ == "__main__":
    main()
