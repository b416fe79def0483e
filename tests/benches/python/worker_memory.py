"""The memory of an idle multiprocessing.Pool worker, for comparison with ours.

Run by the Rust benchmark as `python3 -I -S worker_memory.py METHOD`: starts a Pool of one
worker with that start method, runs one task so that the worker is up, and prints `pss <KiB>`,
the worker's proportional set size (`Pss` of /proc/<pid>/smaps_rollup).
"""

import multiprocessing as mp
import os
import sys


def pid(_):
    return os.getpid()


def pss_kib(process):
    with open(f"/proc/{process}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise RuntimeError("no Pss line")


def main():
    ctx = mp.get_context(sys.argv[1])
    with ctx.Pool(1) as pool:
        worker = pool.apply(pid, (0,))
        print(f"pss {pss_kib(worker)}")


if __name__ == "__main__":
    main()
