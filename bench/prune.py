"""Pruning benchmark on the DESIGN §5 reference protocol (`make bench-prune`); writes BENCHMARKS.md.

SmolLM2-135M-Instruct (computed in fp32 on CPU); calibration = 32 windows of 512 tokens drawn with seed 0
from emma, mansfieldpark, persuasion, sensesensibility, northangerabbey joined by blank lines; evaluation =
the first 16 non-overlapping 1024-token windows of prideprejudice. Every step runs as the real CLI in a
subprocess, timed, with its peak RSS sampled.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import sys
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from measure import run_measured, write_section  # noqa: E402
from sparsezip.assets import austen_files, demo_model_dir  # noqa: E402
from sparsezip.compress import DEFAULT_CODEC  # noqa: E402
from sparsezip.report import inspect_folder  # noqa: E402

CALIB = ["emma", "mansfieldpark", "persuasion", "sensesensibility", "northangerabbey"]
REFERENCE = {  # perplexities of plain reference implementations on the same protocol (DESIGN §5)
    ("dense", ""): 23.15, ("magnitude", "50%"): 355.7, ("wanda", "50%"): 44.50, ("sparsegpt", "50%"): 34.59,
    ("magnitude", "2:4"): 1291, ("wanda", "2:4"): 132.2, ("sparsegpt", "2:4"): 51.77,
}
SETTINGS = {"50%": ["--sparsity", "0.5"], "2:4": ["--pattern", "2:4"], "40%": ["--sparsity", "0.4"]}
# (label, sparsify flags); float_sparse is run with and without its L2 precision rounding
METHODS = [
    ("magnitude", ["--method", "magnitude"]),
    ("wanda", ["--method", "wanda"]),
    ("sparsegpt", ["--method", "sparsegpt"]),
    ("float_sparse", ["--method", "float_sparse", "--rounding", "none"]),
    ("float_sparse + L2 rounding", ["--method", "float_sparse", "--rounding", "l2"]),
]
OWL = [("wanda + OWL", ["--method", "wanda", "--owl"]), ("sparsegpt + OWL", ["--method", "sparsegpt", "--owl"])]


def timed(cmd: list[str]) -> tuple[str, float, float]:
    """Run a command; return its stdout, wall seconds and peak RSS in MiB."""
    result, seconds, peak = run_measured(cmd)
    if result.returncode:
        raise SystemExit(f"benchmark step failed: {' '.join(cmd)}\n{result.stderr[-2000:]}")
    return result.stdout, seconds, peak / 2**20


def sparsezip(*argv: str) -> list[str]:
    return [sys.executable, "-m", "sparsezip", "-q", *argv]


def perplexity(folder: Path, eval_file: Path) -> tuple[float, float]:
    out, seconds, _ = timed(sparsezip("eval", "--model_path", str(folder), "--data", str(eval_file),
                                      "--seqlen", "1024", "--max_windows", "16"))
    return float(re.search(r"perplexity: ([0-9.]+)", out).group(1)), seconds


def bits_per_weight(folder: Path) -> float:
    _, rows = inspect_folder(folder)
    sparse = [r for r in rows if r.kind == "W16A16SC"]
    return 8 * sum(r.stored_bytes for r in sparse) / sum(r.numel for r in sparse)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--work", type=Path, default=REPO / "out" / "bench")
    ns = parser.parse_args()
    model, calib, (evalf,) = demo_model_dir(), austen_files(CALIB), austen_files(["prideprejudice"])
    ppl, _ = perplexity(model, evalf)
    rows = [("dense", "", ppl, None, None)]
    runs = [(m, flags, label) for label in SETTINGS for m, flags in METHODS] + [(m, f, "50%") for m, f in OWL]
    compressed = {}
    for name, flags, label in runs:
        out = ns.work / f"{name}-{label}".replace(" ", "").replace("+", "-").replace(":", "of").replace("%", "")
        _, prune_s, rss = timed(sparsezip("sparsify", "--model_path", str(model), "--save_path", str(out),
                                          "--overwrite", *flags, *SETTINGS[label], "--calib", *map(str, calib),
                                          "--calib_samples", "32", "--calib_seqlen", "512"))
        ppl, _ = perplexity(out, evalf)
        rows.append((name, label, ppl, prune_s, rss))
        print(f"{name:28} {label:4} ppl {ppl:8.2f}  {prune_s:6.0f} s  {rss:6.0f} MiB", flush=True)
        if (name, label) == ("wanda", "50%"):
            compressed = compress_and_check(out, ns.work / "wanda-50-w16a16sc", evalf, ppl)
        write_report(ns.out, rows, compressed)


def compress_and_check(sparse: Path, packed: Path, evalf: Path, sparse_ppl: float) -> dict:
    _, compress_s, _ = timed(sparsezip("compress", "--model_path", str(sparse), "--save_directory", str(packed),
                                       "--overwrite", "--verify"))
    ppl, _ = perplexity(packed, evalf)
    return {"ppl": ppl, "same": ppl == sparse_ppl, "bits": bits_per_weight(packed), "s": compress_s}


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def write_report(path: Path, rows, compressed) -> None:
    """Write this benchmark's two sections of BENCHMARKS.md; the hand-written notes between them stay."""
    cpu = psutil.cpu_count(logical=True)
    lines = [
        f"Machine: {cpu_name()} ({platform.machine()}), {cpu} logical CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, Python {platform.python_version()}, no GPU.  ",
        "Command: `make bench-prune` (`python bench/prune.py`).  ",
        f"Date: {datetime.date.today().isoformat()}.", "",
        "## Pruning quality on the reference protocol (SmolLM2-135M-Instruct, DESIGN §5)", "",
        "Perplexity on the first 16 windows of 1024 tokens of *Pride and Prejudice*; calibration 32 x 512 tokens.",
        "'Reference' is the number plain reference implementations got on the same protocol (from DESIGN §5, not",
        "run here). The demo model's weights come from a Q4_1 GGUF, dequantized to fp16.", "",
        "| method | sparsity | perplexity | reference | prune time (s) | sparsify peak RSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for method, label, ppl, prune_s, rss in rows:
        ref = REFERENCE.get((method, label))
        lines.append(f"| {method} | {label or '0%'} | {ppl:.2f} | {ref if ref else '-'} | "
                     f"{'-' if prune_s is None else f'{prune_s:.0f}'} | {'-' if rss is None else f'{rss:.0f}'} |")
    if not path.exists():
        path.write_text("# Benchmarks\n", encoding="utf-8")
    write_section(path, "prune", "\n".join(lines))
    if compressed:
        write_section(path, "prune-compression", "\n".join([
            f"## Compression (Wanda 50%, TP=1, codec {DEFAULT_CODEC})", "",
            f"- bits per weight of the compressed linears: {compressed['bits']:.3f} "
            f"({compressed['bits'] / 16:.1%} of fp16); label: the demo model sits on a 4-bit grid, "
            + ("but bitmap-v1 stores raw fp16 values, so this ratio does not profit from it"
               if DEFAULT_CODEC == "bitmap-v1" else "so lossless ratios on it are optimistic (see the codec section)"),
            f"- compress time with --verify: {compressed['s']:.1f} s",
            f"- perplexity from the W16A16SC folder: {compressed['ppl']:.4f} "
            f"({'identical to' if compressed['same'] else 'DIFFERENT from'} the W16A16S folder)",
        ]))


if __name__ == "__main__":
    main()
