"""What the Python baselines share. The scripts run under `python3 -I`, which leaves their own
directory off sys.path, so each adds it before importing this module."""

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
