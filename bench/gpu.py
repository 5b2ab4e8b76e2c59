"""GPU benchmark of the Triton kernels (sparsezip.kernels.triton.codec) on square and Qwen3-32B linear shapes.

For an n x n matrix of each --square size (default 4096) and every linear of a Qwen3-32B layer (hidden 5120,
intermediate 25600, 64 query / 8 key-value heads of 128) as one tensor-parallel rank holds it at TP 1, 2 and 4
(qkv_proj and gate_up_proj split by output rows, o_proj and down_proj by input columns), a random weight is 50%
magnitude pruned per row (variant "pruned") and optionally L2-rounded to E5M2 values with 2% kept exact (variant
"l2", sparsezip.rounding), compressed with each codec, and y = x @ W.T is timed at each batch size for:
  fused      triton_codec.linear: reads the compressed tiles, never writes W (batch <= 16; larger
             batches use the fused kernel too here, with --max-fused-m)
  cublas     torch.nn.functional.linear on the dense fp16 weight
  decode+mm  triton_codec.decode into fp16, then torch.nn.functional.linear
Timing: CUDA events around single calls, each call after an L2 flush (a 256 MiB write), warm-up calls
first, median of --iters. Effective bandwidth = bytes the call must read (compressed weight + tables
for fused, 2 bytes/weight for cublas) / time, against the card's peak (looked up from its name).

  python bench/gpu.py [--codec bitmap-v1 huff-v2] [--variant pruned l2] [--square 4096] [--tp 1 2 4]
                      [--batch 1 8 32] [--out BENCHMARKS.md]   # writes the <!-- bench:gpu --> section
  python bench/gpu.py --sweep 8 --tp 1 [--square 4096]   # every strip shape and split of the fused kernel
Needs a CUDA GPU and triton; exits with a one-line message otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))
from measure import print_and_write  # noqa: E402

HIDDEN, INTERMEDIATE, Q_HEADS, KV_HEADS, HEAD_DIM = 5120, 25600, 64, 8, 128
SECTION = "gpu"
# Peak memory bandwidth in TB/s by a substring of torch.cuda.get_device_name(), most specific first.
PEAK_TBPS = [
    ("H200", 4.8), ("H100 NVL", 3.9), ("H100 PCIe", 2.0), ("H100", 3.35), ("GH200", 4.0),
    ("A100-SXM4-80GB", 2.039), ("A100 80GB PCIe", 1.935), ("A100", 1.555), ("L40S", 0.864), ("A10G", 0.6),
]


@dataclass(frozen=True)
class Linear:
    name: str
    n: int  # out_features of one rank
    k: int  # in_features of one rank


def qwen3_32b_linears(tp: int) -> list[Linear]:
    """One TP rank's linears of a Qwen3-32B layer: column-parallel qkv/gate_up, row-parallel o/down."""
    qkv = (Q_HEADS + 2 * KV_HEADS) * HEAD_DIM
    return [
        Linear("qkv_proj", qkv // tp, HIDDEN),
        Linear("o_proj", HIDDEN, Q_HEADS * HEAD_DIM // tp),
        Linear("gate_up_proj", 2 * INTERMEDIATE // tp, HIDDEN),
        Linear("down_proj", HIDDEN, INTERMEDIATE // tp),
    ]


def linears(args: argparse.Namespace) -> list[tuple[int | str, Linear]]:
    """(TP, linear) pairs to measure: the square matrices of --square, then Qwen3-32B's at each --tp."""
    square = [("-", Linear(f"{n}x{n}", n, n)) for n in args.square]
    return square + [(tp, lin) for tp in args.tp for lin in qwen3_32b_linears(tp)]


def make_weight(n: int, k: int, variant: str, seed: int, device: str) -> torch.Tensor:
    """Random fp16 [n, k], 50% magnitude pruned per row; "l2" also rounds to E5M2 values."""
    g = torch.Generator(device=device).manual_seed(seed)
    w = (torch.randn(n, k, generator=g, device=device) * 0.02).half()
    cut = w.abs().float().kthvalue(max(1, k // 2), dim=1, keepdim=True).values  # [n, 1] per-row median |w|
    w = torch.where(w.abs().float() > cut, w, torch.zeros((), dtype=w.dtype, device=device))
    if variant == "l2":
        from sparsezip.rounding import l2_round

        w = l2_round(w, torch.ones(k, device=device))  # no calibration data: every input column weighs 1
    return w


def gpu_time_us(fn: Callable[[], object], iters: int, warmup: int, flush: torch.Tensor) -> float:
    """Median GPU time of one call in microseconds: CUDA events around the call, L2 flushed before each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        flush.zero_()  # evicts the weights from L2, and gives the CPU time to queue the call
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(times)


def peak_tbps(device_name: str) -> float | None:
    for key, tbps in PEAK_TBPS:
        if key in device_name:
            return tbps
    return None


def check_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> float:
    """Largest |y - ref| relative to max |ref| (ref in fp32): a miscompiled kernel shows up here."""
    ref = x.float() @ w.float().T
    return ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def run(args: argparse.Namespace, device: str = "cuda") -> str:
    """Measure every configuration; return the markdown table. (device="cpu" only for a dry run of
    this script under TRITON_INTERPRET=1, with the timer and shapes replaced.)"""
    from sparsezip import codec
    from sparsezip.kernels.triton import codec as tk

    name = torch.cuda.get_device_name() if device == "cuda" else device
    peak = peak_tbps(name)
    flush = torch.empty(256 * 2**20 if device == "cuda" else 1, dtype=torch.uint8, device=device)
    rows = []
    for tp, lin in linears(args):
        for variant in args.variant:
            w = make_weight(lin.n, lin.k, variant, seed=lin.n * 7 + lin.k, device=device)
            for codec_name in args.codec:
                t0 = time.perf_counter()
                enc = codec.encode(w.cpu(), codec_name)
                dw = tk.prepare(enc, device, verify=not args.no_verify)
                setup_s = time.perf_counter() - t0
                assert torch.equal(tk.decode(dw).view(torch.int16), w.view(torch.int16)), "decode mismatch"
                bits = 8 * dw.nbytes / w.numel()
                for batch in args.batch:
                    x = torch.randn(batch, lin.k, device=device).half()
                    err = check_close(tk.linear(x, dw, max_fused_m=args.max_fused_m), x, w)
                    fused = gpu_time_us(lambda: tk.linear(x, dw, max_fused_m=args.max_fused_m),
                                        args.iters, args.warmup, flush)
                    dense = gpu_time_us(lambda: F.linear(x, w), args.iters, args.warmup, flush)
                    dec_mm = gpu_time_us(lambda: F.linear(x, tk.decode(dw)), args.iters, args.warmup, flush)
                    gbps = dw.nbytes / fused / 1e3  # bytes / us / 1e3 = GB/s
                    dense_gbps = 2 * w.numel() / dense / 1e3
                    rows.append([
                        lin.name, tp, f"{lin.n}x{lin.k}", codec_name, variant, batch, f"{bits:.2f}",
                        f"{fused:.1f}", f"{dense:.1f}", f"{dec_mm:.1f}", f"{dense / fused:.2f}",
                        f"{gbps:.0f}", f"{100 * gbps / (peak * 1e3):.0f}%" if peak else "-",
                        f"{dense_gbps:.0f}", f"{err:.1e}",
                    ])
                    print(" | ".join(str(c) for c in rows[-1]), f"(setup {setup_s:.1f} s)", file=sys.stderr)
    return table(rows, name, peak, args)


def sweep(args: argparse.Namespace, device: str = "cuda") -> str:
    """Fused-kernel time at batch 1 for every strip shape and split on each shape of --square and --tp (l2 weights):
    the defaults' time, then the --sweep fastest. Tells a retune from a kernel bound by its own work."""
    from sparsezip import codec
    from sparsezip.kernels.triton import codec as tk

    flush = torch.empty(256 * 2**20 if device == "cuda" else 1, dtype=torch.uint8, device=device)
    lines = ["| linear | TP | n x k | codec | block rows | tiles per step | split-k | fused us | vs cuBLAS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for tp, lin in linears(args):
        w = make_weight(lin.n, lin.k, "l2", seed=lin.n * 7 + lin.k, device=device)
        x = torch.randn(1, lin.k, device=device).half()
        dense = gpu_time_us(lambda: F.linear(x, w), args.iters, args.warmup, flush)
        for codec_name in args.codec:
            dw = tk.prepare(codec.encode(w.cpu(), codec_name), device, verify=False)
            n_tc = dw.tile_grid[1]
            row = lambda strip, us: (f"| {lin.name} | {tp} | {lin.n}x{lin.k} | {codec_name} | {strip} | {us:.1f} | "
                                     f"{dense / us:.2f} |")
            lines.append(row("default | default | default", gpu_time_us(lambda: tk.linear(x, dw), args.iters,
                                                                          args.warmup, flush)))
            timed = []
            for rows, tiles, split in itertools.product((16, 32, 64, 128), (1, 2, 4, 8),
                                                        sorted({1, max(1, n_tc // 8), max(1, n_tc // 2), n_tc})):
                us = gpu_time_us(lambda: tk.linear(x, dw, split_k=split, block_rows=rows, tile_cols=tiles),
                                 args.iters, args.warmup, flush)
                timed.append((us, rows, tiles, split))
            lines += [row(f"{rows} | {tiles} | {split}", us) for us, rows, tiles, split in sorted(timed)[:args.sweep]]
    return "\n".join(lines) + "\n"


def table(rows: list[list[object]], device_name: str, peak: float | None, args: argparse.Namespace) -> str:
    head = ["linear", "TP", "n x k", "codec", "weights", "batch", "device bits/w", "fused us", "cuBLAS us",
            "decode+mm us", "cuBLAS/fused", "fused GB/s", "of peak", "cuBLAS GB/s", "max rel err"]
    lines = [
        f"GPU: **{device_name}** (peak {peak} TB/s)" if peak else f"GPU: **{device_name}** (peak bandwidth unknown)",
        f"torch {torch.__version__}, triton {__import__('triton').__version__}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC. Command: `python bench/gpu.py "
        f"{' '.join(sys.argv[1:])}`",
        "",
        "Square n x n matrices (TP -) and Qwen3-32B linears of one TP rank, random weights 50% magnitude-pruned per "
        "row (`l2`: then L2-rounded, 2% exact). Median of "
        f"{args.iters} calls, each after an L2 flush, CUDA events. GB/s = bytes read (compressed weight + tables "
        "for fused, fp16 weight for cuBLAS) / time; device bits/w counts the same compressed bytes per weight. "
        "cuBLAS/fused > 1 means the fused kernel is faster.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--codec", nargs="+", default=["bitmap-v1", "huff-v2"])
    p.add_argument("--variant", nargs="+", default=["pruned", "l2"], choices=["pruned", "l2"])
    p.add_argument("--tp", nargs="+", type=int, default=[1, 2, 4], choices=[1, 2, 4, 8])
    p.add_argument("--square", nargs="*", type=int, default=[4096], help="also n x n matrices of these sizes")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--max-fused-m", type=int, default=32, help="largest batch the fused kernel takes (<= 64)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-verify", action="store_true", help="skip the host reference decode in prepare()")
    p.add_argument("--sweep", type=int, metavar="N", help="instead: time every strip shape and split of the fused "
                   "kernel at batch 1 on the shapes of --square and --tp and print each codec's N fastest")
    p.add_argument("--out", type=Path, help="also write the table into this markdown file's gpu section")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU (torch.cuda.is_available() is False here); nothing was measured")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("bench/gpu.py needs triton (pip install -r requirements.txt); nothing was measured")
    if args.sweep:
        print(sweep(args))
        return
    print_and_write(run(args), args.out, SECTION)


if __name__ == "__main__":
    main()
