"""Python's multiprocessing on the bound-data workload of tests/benches/bound.rs.

`python3 -I -S bound_bench.py METHOD PROCESSES LEN RUNS` prints `name <seconds>` lines, each
the median of RUNS after a warm-up, for 10 tasks that each sum every step-th element of a
LEN-element list: `none` (each worker builds the list in its initializer), `argument` (the
list sent with every task) and `initializer` (the list handed to each worker once through the
initializer). Each time covers starting the pool and running the tasks.
"""

import multiprocessing as mp
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import median_time  # noqa: E402

DATA = None


def keep(data):
    global DATA
    DATA = data


def build(length):
    keep(list(range(length)))


def strided_sum(step):
    return sum(DATA[::step])


def strided_sum_of(data, step):
    return sum(data[::step])


def main():
    method, processes, length, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    ctx = mp.get_context(method)
    data = list(range(length))
    steps = list(range(1, 11))

    def none():
        with ctx.Pool(processes, initializer=build, initargs=(length,)) as pool:
            pool.map(strided_sum, steps, chunksize=1)

    def argument():
        with ctx.Pool(processes) as pool:
            pool.starmap(strided_sum_of, [(data, s) for s in steps], chunksize=1)

    def initializer():
        with ctx.Pool(processes, initializer=keep, initargs=(data,)) as pool:
            pool.map(strided_sum, steps, chunksize=1)

    print(f"none {median_time(runs, none)}")
    print(f"argument {median_time(runs, argument)}")
    print(f"initializer {median_time(runs, initializer)}")


if __name__ == "__main__":
    main()
