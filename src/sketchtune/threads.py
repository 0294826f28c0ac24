"""How many CPU threads torch should use: the cores no other work keeps busy, measured when a command starts."""

from __future__ import annotations

import os
import time


def free_cores(sample_seconds: float = 0.1) -> int:
    """Cores of this process's CPU set that no other work keeps busy, from two /proc/stat samples.

    torch defaults to one thread per core; when another job holds a core, those threads oversubscribe it and
    every parallel region waits for the slowest (the default sketch took 9× longer with one of two cores busy).
    """
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1

    def snapshot() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = snapshot()
        time.sleep(sample_seconds)
        total1, idle1 = snapshot()
    except (OSError, ValueError, IndexError):
        return n
    machine = os.cpu_count() or n
    busy = (1 - (idle1 - idle0) / max(1, total1 - total0)) * machine
    return max(1, min(n, n - round(busy)))
