"""Wall time and peak resident memory of a child process (shared by the benchmarks and the memory test)."""

from __future__ import annotations

import subprocess
import time

import psutil


def run_measured(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float, int]:
    """Run `cmd`; return the finished process (stdout, stderr as text), wall seconds and peak RSS in bytes.

    RSS is sampled every 20 ms, so a peak shorter than that can be missed; sparsify's peaks last longer.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watcher, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, watcher.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), time.perf_counter() - start, peak
