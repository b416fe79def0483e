"""Python's multiprocessing on the workloads of tests/benches/data.rs.

`python3 -I -S data_bench.py METHOD SIZE RUNS` prints, as `name <median seconds>` lines:
`argument` (SIZE bytes as a Pool.apply argument, returned), `empty` (Pool.apply of a task that
does nothing) and `shared` (a SharedMemory block of SIZE bytes handed to Pool.apply by name).
"""

import multiprocessing as mp
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import median_time  # noqa: E402
from multiprocessing import shared_memory


def echo(data):
    return data


def empty():
    return None


def touch(name):
    block = shared_memory.SharedMemory(name=name)
    first, last = block.buf[0], block.buf[block.size - 1]
    block.close()
    return first + last


def main():
    method, size, runs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ctx = mp.get_context(method)
    data = b"x" * size
    block = shared_memory.SharedMemory(create=True, size=size)
    block.buf[:size] = data
    try:
        with ctx.Pool(1) as pool:
            print(f"argument {median_time(runs, lambda: pool.apply(echo, (data,)))}")
            print(f"empty {median_time(runs, lambda: pool.apply(empty))}")
            print(f"shared {median_time(runs, lambda: pool.apply(touch, (block.name,)))}")
    finally:
        block.close()
        block.unlink()


if __name__ == "__main__":
    main()
