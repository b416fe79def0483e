"""Python's multiprocessing on the bound-data workload of tests/benches/bound.rs.

`python3 -I -S bound_bench.py METHOD PROCESSES LEN` prints `name <seconds>` lines for 10 tasks
that each sum every step-th element of a LEN-element list: `none` (each worker builds the list
in its initializer), `argument` (the list sent with every task) and `initializer` (the list
handed to each worker once through the initializer). Each time covers starting the pool and
running the tasks.
"""

import multiprocessing as mp
import sys
import time

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


def timed(body):
    started = time.perf_counter()
    body()
    return time.perf_counter() - started


def main():
    method, processes, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
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

    print(f"none {timed(none)}")
    print(f"argument {timed(argument)}")
    print(f"initializer {timed(initializer)}")


if __name__ == "__main__":
    main()
