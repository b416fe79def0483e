"""Python's multiprocessing.Pipe on the workloads of tests/benches/pipe.rs.

`python3 -I -S pipe_bench.py RUNS REPEATS SIZE:COUNT...` prints `rtt <median seconds>` for the
round trip of a small object, then per SIZE:COUNT `bulk_<size> <seconds>`: the median over
REPEATS transfers of the time to send COUNT messages of SIZE bytes to a child that acknowledges
the last one. A spec `queue:COUNT` prints `queue <seconds>` instead: the median over REPEATS of
the time for a child to put COUNT small ints on a multiprocessing.Queue and this process to get
them all. With MULTIPROC_BENCH_CPUS=PARENT,PEER the round trip's echo runs on PEER and this
process on PARENT (see `benchlib.peers_apart`).
"""

import multiprocessing as mp
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import peers_apart  # noqa: E402


def echo(other, conn):
    other.close()  # the parent's end, inherited through fork
    while True:
        try:
            conn.send(conn.recv())
        except EOFError:
            return


def sink(other, conn, count):
    other.close()
    for _ in range(count):
        conn.recv_bytes()
    conn.send_bytes(b"")


def main():
    runs = int(sys.argv[1])
    ctx = mp.get_context("fork")
    ours, theirs = ctx.Pipe()
    to_parent = peers_apart()
    child = ctx.Process(target=echo, args=(ours, theirs))
    child.start()
    to_parent()
    theirs.close()
    rtts = []
    for i in range(runs):
        started = time.perf_counter()
        ours.send(i)
        ours.recv()
        rtts.append(time.perf_counter() - started)
    ours.close()
    child.join()
    print(f"rtt {statistics.median(rtts)}")
    repeats = int(sys.argv[2])
    for spec in sys.argv[3:]:
        if spec.startswith("queue:"):
            count = int(spec.split(":")[1])
            times = [queue_throughput(ctx, count) for _ in range(repeats)]
            print(f"queue {statistics.median(times)}")
            continue
        size, count = (int(x) for x in spec.split(":"))
        times = [bulk(ctx, size, count) for _ in range(repeats)]
        print(f"bulk_{size} {statistics.median(times)}")


def fill(queue, count):
    for i in range(count):
        queue.put(i)


def queue_throughput(ctx, count):
    queue = ctx.Queue()
    started = time.perf_counter()
    child = ctx.Process(target=fill, args=(queue, count))
    child.start()
    for _ in range(count):
        queue.get()
    took = time.perf_counter() - started
    child.join()
    return took


def bulk(ctx, size, count):
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=sink, args=(ours, theirs, count))
    child.start()
    theirs.close()
    message = b"x" * size
    started = time.perf_counter()
    for _ in range(count):
        ours.send_bytes(message)
    ours.recv_bytes()
    took = time.perf_counter() - started
    ours.close()
    child.join()
    return took


if __name__ == "__main__":
    main()
