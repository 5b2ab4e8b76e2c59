"""The linears alone: how fast each weight layout multiplies one activation row (or --rows of them) by every linear of
a model, streamed from memory and from cache, against the read bandwidth. For A/B checks of a kernel change and for
telling whether a layout is bound by its bytes or by its instructions.

    python bench/linears.py DENSE_FOLDER:dense PACKED_FOLDER:sparse [PACKED_FOLDER:compressed ...] --threads 1

Streamed: one pass over every linear in model order (each matrix is read once, as in a decode step; a 1B model's
weights are far larger than the caches), median of --rounds passes. Cached: each linear small enough to stay in a
cache (fp16 size at most --cached_kib; a model's fused projections are often larger than L2, so the default admits
L3) multiplied --repeats times in a row, the first call not counted. A layout is bound by its instructions when its
streamed time per weight is close to its cached one, and by memory when its streamed rate is close to the probed
bandwidth. The first case is the baseline of the ratio column.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

LAYOUTS = ("dense", "sparse", "compressed")


@dataclass(frozen=True)
class Case:
    folder: Path
    layout: str

    @property
    def label(self) -> str:
        return f"{self.folder.name}:{self.layout}"


def parse_case(text: str) -> Case:
    folder, sep, layout = text.rpartition(":")
    if not sep or layout not in LAYOUTS:
        raise SystemExit(f"linears: {text!r}: give FOLDER:LAYOUT with LAYOUT one of {', '.join(LAYOUTS)}")
    if not (Path(folder) / "config.json").is_file():
        raise SystemExit(f"linears: {folder!r} is not a model folder (no config.json)")
    return Case(Path(folder), layout)


def model_linears(case: Case) -> list:
    """The weight-layout modules of the model loaded from the case's folder in its layout, in model order."""
    from sparsezip.errors import SparsezipError
    from sparsezip.layouts.base import WeightLayout
    from sparsezip.runtime import load_model

    try:
        model = load_model(case.folder, weights=case.layout)
    except SparsezipError as e:
        raise SystemExit(f"linears: {case.label}: {e}") from None
    return [m for m in model.modules() if isinstance(m, WeightLayout)]


def streamed_seconds(linears: list, rounds: int, rows: int = 1) -> float:
    """Median wall time of one pass over every linear with `rows` activation rows (after one pass not counted)."""
    import torch

    inputs = {m.in_features: torch.randn(rows, m.in_features) for m in linears}

    def one_pass() -> float:
        start = time.perf_counter()
        for m in linears:
            m(inputs[m.in_features])
        return time.perf_counter() - start

    one_pass()
    return statistics.median(one_pass() for _ in range(rounds))


def cached_seconds_per_weight(linears: list, max_fp16_bytes: int, repeats: int, rows: int = 1) -> float | None:
    """Seconds per weight of the linears whose fp16 size fits in max_fp16_bytes, each repeated from cache."""
    import torch

    small = [m for m in linears if 2 * m.in_features * m.out_features <= max_fp16_bytes]
    if not small:
        return None
    total, weights = 0.0, 0
    for m in small:
        x = torch.randn(rows, m.in_features)
        m(x)  # brings the matrix into cache
        start = time.perf_counter()
        for _ in range(repeats):
            m(x)
        total += time.perf_counter() - start
        weights += repeats * m.in_features * m.out_features
    return total / weights


def measure(case: Case, args) -> dict:
    import torch

    with torch.inference_mode():  # as generation runs: some layouts keep trainable parameters (a bias)
        return measure_linears(case, args)


def measure_linears(case: Case, args) -> dict:
    linears = model_linears(case)
    if not linears:
        raise SystemExit(f"linears: {case.label}: the model has no linear layers")
    weights = sum(m.in_features * m.out_features for m in linears)
    seconds = streamed_seconds(linears, args.rounds, args.rows)
    return {"case": case.label, "weights": weights,
            "bytes": sum(m.resident_bytes() for m in linears), "seconds": seconds,
            "cached_s_per_weight": cached_seconds_per_weight(linears, args.cached_kib * 1024, args.repeats,
                                                             args.rows)}


def table(results: list[dict], bandwidth: float, threads: int, rows: int = 1) -> str:
    """Markdown rows: streamed ms per pass, ps per weight streamed and cached, GB/s and its share of the probe, and
    the streamed speed against the first case."""
    base = results[0]["seconds"]
    lines = [f"Linears alone, {rows} activation row(s) per call, {threads} thread(s); read bandwidth probe "
             f"{bandwidth / 1e9:.1f} GB/s.", "", "| layout | MB | streamed ms / pass | ps / weight streamed | ps / weight cached | GB/s streamed "
             "(% of probe) | speed vs first |", "|---|---|---|---|---|---|---|"]
    for r in results:
        rate = r["bytes"] / r["seconds"]
        cached = "-" if r["cached_s_per_weight"] is None else f"{r['cached_s_per_weight'] * 1e12:.1f}"
        lines.append(f"| {r['case']} | {r['bytes'] / 1e6:.0f} | {r['seconds'] * 1e3:.1f} | "
                     f"{r['seconds'] / r['weights'] * 1e12:.1f} | {cached} | "
                     f"{rate / 1e9:.1f} ({rate / bandwidth:.0%}) | {base / r['seconds']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("cases", nargs="+", help="FOLDER:LAYOUT, LAYOUT one of dense, sparse, compressed; the first is "
                                            "the baseline")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=1, help="activation rows per call: 1 is a decode step at batch 1, 8 "
                                                      "at batch 8 (the weights are still read once per call)")
    p.add_argument("--rounds", type=int, default=7, help="streamed passes timed (median)")
    p.add_argument("--repeats", type=int, default=50, help="calls per cached linear")
    p.add_argument("--cached_kib", type=int, default=8192,
                   help="largest fp16 size of a linear timed from cache (keep it under the L2 or L3 size)")
    p.add_argument("--probe_mib", type=int, default=512, help="MiB the bandwidth probe reads (far beyond the caches)")
    args = p.parse_args(argv)
    if min(args.threads, args.rows, args.rounds, args.repeats, args.cached_kib, args.probe_mib) < 1:
        raise SystemExit("linears: --threads, --rows, --rounds, --repeats, --cached_kib and --probe_mib must be "
                         "positive")
    cases = [parse_case(c) for c in args.cases]
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by sparsezip's kernels: set before they are asked
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO / "bench"))
    from run import probe_buffer, read_bandwidth

    results = [measure(c, args) for c in cases]
    print(table(results, read_bandwidth(probe_buffer(args.probe_mib), args.threads), args.threads, args.rows))


if __name__ == "__main__":
    main()
