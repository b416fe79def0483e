"""Python's multiprocessing.Pool on the workloads of tests/benches/pool.rs, for comparison.

Run by the Rust benchmark as `python3 -I -S pool_bench.py METHOD PROCESSES APPLY MAP IMAP`;
prints `apply <median round trip>`, `map <seconds>` and `imap <seconds>` lines.
"""

import multiprocessing as mp
import statistics
import sys
import time


def identity(x):
    return x


def main():
    method, processes, applies, map_items, imap_items = sys.argv[1:6]
    processes, applies = int(processes), int(applies)
    map_items, imap_items = int(map_items), int(imap_items)
    ctx = mp.get_context(method)
    with ctx.Pool(processes) as pool:
        pool.apply(identity, (0,))
        rtts = []
        for i in range(applies):
            started = time.perf_counter()
            pool.apply(identity, (i,))
            rtts.append(time.perf_counter() - started)
        started = time.perf_counter()
        result = pool.map(identity, range(map_items))
        map_seconds = time.perf_counter() - started
        assert result[-1] == map_items - 1
        started = time.perf_counter()
        count = sum(1 for _ in pool.imap(identity, range(imap_items), chunksize=1))
        imap_seconds = time.perf_counter() - started
        assert count == imap_items
    print(f"apply {statistics.median(rtts)}")
    print(f"map {map_seconds}")
    print(f"imap {imap_seconds}")


if __name__ == "__main__":
    main()
