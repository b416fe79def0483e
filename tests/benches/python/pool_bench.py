"""Python's multiprocessing.Pool on the workloads of tests/benches/pool.rs, for comparison.

Run by the Rust benchmark as
`python3 -I -S pool_bench.py METHOD PROCESSES APPLY MAP IMAP MAP_RUNS IMAP_RUNS`; prints
`apply <median round trip>`, `map <seconds>` and `imap <seconds>` lines. map and imap run once
to warm up and then RUNS times, and the median is printed; IMAP_RUNS 0 means one run without a
warm-up, and MAP or IMAP 0 leaves that workload out. With MULTIPROC_BENCH_CPUS=PARENT,PEER
the workers run on PEER and this process on PARENT (see `benchlib.peers_apart`).
"""

import multiprocessing as mp
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import median_time, peers_apart  # noqa: E402


def identity(x):
    return x


def timed(f):
    started = time.perf_counter()
    f()
    return time.perf_counter() - started


def main():
    method = sys.argv[1]
    processes, applies, map_items, imap_items, map_runs, imap_runs = map(int, sys.argv[2:8])
    ctx = mp.get_context(method)
    to_parent = peers_apart()
    with ctx.Pool(processes) as pool:
        to_parent()
        pool.apply(identity, (0,))
        rtts = []
        for i in range(applies):
            started = time.perf_counter()
            pool.apply(identity, (i,))
            rtts.append(time.perf_counter() - started)

        def run_map():
            result = pool.map(identity, range(map_items))
            assert result[-1] == map_items - 1

        def run_imap():
            count = sum(1 for _ in pool.imap(identity, range(imap_items), chunksize=1))
            assert count == imap_items

        map_seconds = median_time(map_runs, run_map) if map_items else None
        if not imap_items:
            imap_seconds = None
        elif imap_runs:
            imap_seconds = median_time(imap_runs, run_imap)
        else:
            imap_seconds = timed(run_imap)
    print(f"apply {statistics.median(rtts)}")
    if map_seconds is not None:
        print(f"map {map_seconds}")
    if imap_seconds is not None:
        print(f"imap {imap_seconds}")


if __name__ == "__main__":
    main()
