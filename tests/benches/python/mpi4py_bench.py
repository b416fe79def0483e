"""mpi4py.futures, the MPI process pool Python users have, on the workloads of
tests/benches/mpi.rs, for comparison.

Run by the Rust benchmark as
`mpirun -n 3 python3 -I -m mpi4py.futures mpi4py_bench.py ITEMS RUNS APPLY` (rank 0 runs
this script, the two other ranks are its workers); prints `chunk1 <seconds>` (map of ITEMS
trivial items with chunksize 1), `chunk100 <seconds>` (chunksize 100, its best) and
`apply <median round trip>` lines, each the median of RUNS runs after a warm-up.
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import median_time  # noqa: E402
from mpi4py.futures import MPIPoolExecutor  # noqa: E402


def identity(x):
    return x


def main():
    items, runs, applies = map(int, sys.argv[1:4])
    with MPIPoolExecutor() as pool:
        for chunksize in (1, 100):
            took = median_time(runs, lambda: list(pool.map(identity, range(items), chunksize=chunksize)))
            print(f"chunk{chunksize} {took}")
        pool.submit(identity, 0).result()
        rtts = []
        for i in range(applies):
            started = time.perf_counter()
            pool.submit(identity, i).result()
            rtts.append(time.perf_counter() - started)
        print(f"apply {statistics.median(rtts)}")


if __name__ == "__main__":
    main()
