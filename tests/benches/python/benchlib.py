"""What the Python baselines share. The scripts run under `python3 -I`, which leaves their own
directory off sys.path, so each adds it before importing this module."""

import os
import statistics
import time


def median_time(runs, body):
    """Runs `body` once to warm up (a forkserver or pool starts there), then `runs` times;
    returns the median duration in seconds."""
    body()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        body()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def peers_apart():
    """Under MULTIPROC_BENCH_CPUS=PARENT,PEER (the Rust benchmark's `across_cpus`): pins this
    process to PEER, so that the processes it starts next (and a forkserver it launches) run
    there, and returns a function that moves every thread of this process (a Pool's handler
    threads included) to PARENT. Without the variable both do nothing."""
    cpus = os.environ.get("MULTIPROC_BENCH_CPUS")
    if not cpus:
        return lambda: None
    parent, peer = (int(cpu) for cpu in cpus.split(","))
    os.sched_setaffinity(0, {peer})

    def to_parent():
        for tid in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(tid), {parent})

    return to_parent
