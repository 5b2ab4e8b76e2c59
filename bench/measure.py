"""Shared by the benchmarks (and the memory test): wall time and peak resident memory of a child process;
writing one section of BENCHMARKS.md."""

from __future__ import annotations

import os
import sys
import subprocess
import time
from pathlib import Path

import psutil


def run_measured(cmd: list[str], env: dict | None = None) -> tuple[subprocess.CompletedProcess, float, int]:
    """Run `cmd` (with `env` added to the environment); return the finished process (stdout, stderr as text),
    wall seconds and peak RSS in bytes.

    RSS is sampled every 20 ms, so a peak shorter than that can be missed; sparsify's peaks last longer.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    watcher, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, watcher.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), time.perf_counter() - start, peak


def write_section(path: Path, name: str, markdown: str) -> None:
    """Replace the text between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->` in `path` with `markdown`.

    BENCHMARKS.md is shared by several benchmarks, each owning its sections; everything outside the
    markers (hand-written notes, other sections) is kept. A missing section is appended; a missing file
    is created. Written to a temporary file and renamed, so an interrupted run never truncates the file.
    """
    path = Path(path)
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    block = f"{start}\n{markdown.strip(chr(10))}\n{end}"
    i, j = text.find(start), text.find(end)
    if i >= 0 and j > i:
        text = text[:i] + block + text[j + len(end):]
    elif i >= 0 or j >= 0:
        raise ValueError(f"{path}: the markers of section {name!r} are incomplete or out of order; fix them by hand")
    else:
        text = (text.rstrip("\n") + "\n\n" if text.strip() else "") + block + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def print_and_write(markdown: str, out: Path | None, name: str) -> None:
    """Print a benchmark's markdown and, given `out`, also put it in that file's section `name`."""
    print(markdown)
    if out:
        write_section(out, name, markdown)
        print(f"wrote section <!-- bench:{name} --> of {out}", file=sys.stderr)
