"""Python's multiprocessing on the workloads of tests/benches/startup.rs.

`python3 -I -S startup_bench.py METHOD RUNS BURST BURST_RUNS` prints `start_join <median
seconds>` for start -> join of a Process with a trivial target, one at a time, and `burst
<median seconds>` for BURST processes started together, then joined (unless BURST_RUNS is 0).
"""

import multiprocessing as mp
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import median_time  # noqa: E402


def noop():
    pass


def main():
    method, runs, burst, burst_runs = sys.argv[1], *(int(a) for a in sys.argv[2:5])
    ctx = mp.get_context(method)

    def one():
        p = ctx.Process(target=noop)
        p.start()
        p.join()

    def many():
        ps = [ctx.Process(target=noop) for _ in range(burst)]
        for p in ps:
            p.start()
        for p in ps:
            p.join()

    print(f"start_join {median_time(runs, one)}")
    if burst_runs:
        print(f"burst {median_time(burst_runs, many)}")


if __name__ == "__main__":
    main()
