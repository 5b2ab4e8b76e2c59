"""Quality at size (`make bench-quality`): perplexity against bits per weight on the demo model, with llama.cpp's
Q8_0 and Q4_0 of the same model as the reference points; a PNG plot and a section of BENCHMARKS.md.

Every point is scored on the same token windows: the first --windows non-overlapping --seqlen-token windows of
Pride and Prejudice, made once with the demo tokenizer (sparsezip.data.eval_windows, as `sparsezip eval`) and
handed to both engines as token ids.

  float_sparse  pruned at each --sparsities value, with and without L2 rounding (`sparsezip sparsify`, calibrated
                on Emma), then compressed at TP 1 with each --codecs codec (`sparsezip compress --verify`, so
                the compressed folder is checked bit for bit: one perplexity per pruned folder, several sizes)
  dense fp16    the model as it is: 16 bits per weight
  llama.cpp     F16, Q8_0 and Q4_0 GGUFs exported from the same folder (bench/llamacpp.py), perplexity from
                llama.cpp itself on the same windows; F16 checks that both engines agree on the dense model

Bits per weight always count the per-layer matrices only (attention and MLP projections: what sparsify
prunes, the `blk.*` 2-D tensors of a GGUF); embeddings and norms are left out on every side.
  sparse layout  resident bytes of the runtime's `--weights sparse` matrices (bitmap codes, tile offsets, values)
  nibble-v3, huff-v2  stored bytes of the compressed linears (`.weight` + `.index` + `.info`) in the W16A16SC part
  llama.cpp      stored bytes of the blk.* matrices in the GGUF, block scales included

Built folders and GGUFs are cached under --work, named by their settings, so a rerun only re-scores.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))
import llamacpp  # noqa: E402
from measure import write_section  # noqa: E402

SPARSITIES = (0.3, 0.4, 0.5)
ROUNDINGS = ("l2", "none")
CODECS = ("nibble-v3", "huff-v2")
GGUF_TYPES = ("f16", "q8_0", "q4_0")
SPARSE_LAYOUT = "sparse"
AGREEMENT = 0.005  # llama.cpp F16 vs our dense perplexity: fp16 activations in llama.cpp's matmuls cost ~0.1%
PLOT = REPO / "docs" / "quality_vs_bits.png"
# plot styles: one marker (and colour) per layout, one line style per rounding setting
LAYOUT_STYLE = {SPARSE_LAYOUT: ("o", "tab:blue"), "nibble-v3": ("s", "tab:orange"), "huff-v2": ("^", "tab:green"),
                "bitmap-v1": ("D", "tab:purple")}
ROUNDING_STYLE = {"l2": ("-", "L2 rounding"), "none": (":", "no rounding")}
START = time.monotonic()


@dataclass
class Point:
    """One row of the table: a perplexity and the bits per weight of each way the same weights are stored."""

    config: str
    ppl: float
    bits: dict[str, float] = field(default_factory=dict)  # layout or format -> bits per weight
    sparsity: float = 0.0
    rounding: str | None = None


def progress(message: str) -> None:
    print(f"[{time.monotonic() - START:6.0f} s] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ building (cached under --work)


def sparsezip_cli(threads: int, *argv: str) -> None:
    """One `sparsezip` command in a subprocess, on `threads` threads; its stderr tail on failure."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-m", "sparsezip", "-q", *argv], capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"bench-quality: `sparsezip {' '.join(argv[:1])}` failed:\n{proc.stderr[-2000:]}")


def pruned_folder(ns: argparse.Namespace, sparsity: float, rounding: str) -> Path:
    """The float_sparse W16A16S folder for these settings; sparsify writes it atomically, so one that exists is
    complete. Its name carries every setting that changes it, so changed flags never reuse a stale folder."""
    folder = ns.work / (f"float_sparse-s{sparsity:g}-{rounding}-{ns.calib.stem}-"
                        f"{ns.calib_samples}x{ns.calib_seqlen}")
    if not folder.exists():
        progress(f"sparsify float_sparse {sparsity:.0%}, rounding {rounding} -> {folder} (about 2 min on 2 cores)")
        sparsezip_cli(ns.threads, "sparsify", "--model_path", str(ns.model), "--save_path", str(folder),
                      "--method", "float_sparse", "--sparsity", str(sparsity), "--rounding", rounding,
                      "--calib", str(ns.calib), "--calib_samples", str(ns.calib_samples),
                      "--calib_seqlen", str(ns.calib_seqlen), "--device", "cpu")
    return folder


def compressed_folder(pruned: Path, codec: str, threads: int) -> Path:
    """The TP-1 W16A16SC folder of `pruned` in `codec`, decoded and compared bit for bit once when made."""
    folder = pruned.with_name(f"{pruned.name}-{codec}")
    if not folder.exists():
        progress(f"compress {pruned.name} with {codec}")
        sparsezip_cli(threads, "compress", "--model_path", str(pruned), "--save_directory", str(folder),
                      "--codec", codec, "--tp", "1", "--workers", str(threads), "--verify")
    return folder


def gguf_files(ns: argparse.Namespace) -> dict[str, Path]:
    """f16/q8_0/q4_0 GGUFs of the dense model (llama.cpp's own quantizer for the last two), made once."""
    out = ns.work / "gguf"
    files = {q: out / f"{q}.gguf" for q in GGUF_TYPES}
    for q, path in files.items():
        if not path.exists():
            progress(f"export {path}")
            llamacpp.export_gguf(ns.model, path, q, f16=files["f16"] if q != "f16" else None, threads=ns.threads)
    return files


# ------------------------------------------------------------------ measuring


def sparsezip_ppl(folder: Path, windows) -> float:
    """Perplexity of any folder kind on the windows, with the dense layout in fp32 (every layout computes the
    same numbers; the dense one is the quickest to build)."""
    from sparsezip.evaluate import perplexity
    from sparsezip.runtime import load_model

    model = load_model(folder, device="cpu", weights="dense")
    return perplexity(model, windows, show_progress=False)


def sparse_layout_bits(folder: Path) -> float:
    """Bits per weight of the pruned linears held in the runtime's sparse layout: their resident bytes over their
    weight count (the layout is built in memory on load; it is not a file)."""
    from sparsezip.layouts.sparse import SparseLinear
    from sparsezip.runtime import load_model

    model = load_model(folder, device="cpu", weights=SPARSE_LAYOUT)
    layers = [m for m in model.modules() if isinstance(m, SparseLinear)]
    if not layers:
        raise SystemExit(f"bench-quality: {folder} loaded without SparseLinear modules")
    stored = sum(m.resident_bytes() for m in layers)
    return bits_per_weight(stored, sum(m.out_features * m.in_features for m in layers))


def codec_bits(folder: Path) -> float:
    """Bits per weight of a W16A16SC folder's compressed linears, from the safetensors headers of its parts: the
    stored bytes of each linear's .weight, .index and .info over the weights they decode to."""
    from sparsezip.formats import PartReader, part_dirs

    stored = weights = 0
    for part in map(PartReader, part_dirs(folder)):
        for prefix in part.linear_prefixes():
            stored += part.linear_bytes(prefix)
            weights += part.linear_numel(prefix)
    return bits_per_weight(stored, weights)


def bits_per_weight(stored_bytes: int, weights: int) -> float:
    if weights <= 0:
        raise ValueError("no weights to divide by")
    return 8 * stored_bytes / weights


def measure_float_sparse(ns: argparse.Namespace, windows) -> list[Point]:
    points = []
    for rounding in ns.roundings:
        for sparsity in ns.sparsities:
            pruned = pruned_folder(ns, sparsity, rounding)
            point = Point("float_sparse", sparsezip_ppl(pruned, windows), sparsity=sparsity, rounding=rounding)
            point.bits[SPARSE_LAYOUT] = sparse_layout_bits(pruned)
            for codec in ns.codecs:
                point.bits[codec] = codec_bits(compressed_folder(pruned, codec, ns.threads))
            progress(f"float_sparse {sparsity:.0%} {rounding:4}: ppl {point.ppl:.3f}, bits/weight "
                     + ", ".join(f"{k} {v:.3f}" for k, v in point.bits.items()))
            points.append(point)
    return points


def measure_llamacpp(ns: argparse.Namespace, windows) -> list[Point]:
    ids = windows.tolist()
    points = []
    for qtype, path in gguf_files(ns).items():
        progress(f"llama.cpp perplexity on {path.name} ({len(ids)} windows)")
        result = llamacpp.perplexity(path, ids, threads=ns.threads)
        bits = llamacpp.linear_bits(path)["bits_per_weight"]
        points.append(Point(f"llama.cpp {qtype.upper()}", result["ppl"], {"own": bits}))
        progress(f"llama.cpp {qtype.upper()}: ppl {result['ppl']:.3f}, {bits:.3f} bits/weight")
    return points


def relative_gap(a: float, b: float) -> float:
    return a / b - 1.0


# ------------------------------------------------------------------ report


def table(points: list[Point], dense_ppl: float, codecs: list[str]) -> list[str]:
    head = ["config", "sparsity", "rounding", "perplexity", "vs dense", "sparse layout", *codecs, "own format"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        cells = [p.config, f"{p.sparsity:.0%}", p.rounding or "-", f"{p.ppl:.3f}",
                 f"{relative_gap(p.ppl, dense_ppl):+.1%}" if p.config != "dense fp16" else "-"]
        cells += [f"{p.bits[k]:.3f}" if k in p.bits else "-" for k in (SPARSE_LAYOUT, *codecs, "own")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def machine() -> str:
    import psutil
    from prune import cpu_name

    return (f"{cpu_name()} ({platform.machine()}), {psutil.cpu_count(logical=True)} logical CPUs, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, Python {platform.python_version()}")


def report(ns: argparse.Namespace, points: list[Point], dense_ppl: float, f16_gap: float | None,
           n_windows: int) -> str:
    record = llamacpp.read_build_record()
    lines = [
        "## Quality at size: perplexity against bits per weight (`make bench-quality`)", "",
        f"Machine: {machine()}, no GPU.  ",
        f"Command: `python bench/quality.py {' '.join(sys.argv[1:])}`.  ",
        f"Date: {datetime.date.today().isoformat()}.", "",
        f"Model: {ns.model.name} (its fp16 weights come from a Q4_1 GGUF). Perplexity on the first {n_windows} "
        f"windows of {ns.seqlen} tokens of `{ns.data.name}`, the same token ids for every row (llama.cpp gets them "
        "as ids), every next token scored. float_sparse is calibrated on "
        f"`{ns.calib.name}`, {ns.calib_samples} windows of {ns.calib_seqlen} tokens (seed 0); 'rounding l2' is "
        "`--rounding l2` (kept weights rounded to E5M2, 2% exact). Each pruned folder has one perplexity (the "
        "layouts are lossless; `compress --verify` checked every tensor bit for bit) and one size per layout.", "",
        "Bits per weight count the per-layer attention and MLP matrices only (what sparsify prunes; a GGUF's 2-D "
        "`blk.*` tensors), not the embedding or the norms: 'sparse layout' is the resident size of `--weights "
        "sparse` in memory (not a file), the codec columns the stored `.weight` + `.index` + `.info` of the "
        "W16A16SC folder (TP 1), 'own format' the fp16 matrices or the GGUF's tensors with their block scales. "
        f"llama.cpp is llama-cpp-python {record.get('llama_cpp_python', '?')} (`bench/llamacpp.py`), Q8_0 and "
        "Q4_0 made by its own quantizer with its default per-tensor choices from the F16 export.", "",
        *table(points, dense_ppl, ns.codecs), "",
    ]
    if f16_gap is not None:
        verdict = "agree" if abs(f16_gap) <= AGREEMENT else "DISAGREE"
        lines += [f"llama.cpp F16 against sparsezip's dense fp32 compute on the same fp16 weights: {f16_gap:+.3%} "
                  f"in perplexity ({verdict}; the check allows {AGREEMENT:.1%}: llama.cpp rounds activations to "
                  "fp16 in its F16 matmuls).", ""]
    if ns.plot:
        link = os.path.relpath(ns.plot.resolve(), (ns.out or REPO / "BENCHMARKS.md").resolve().parent)
        lines.append(f"![perplexity against bits per weight]({link})")
    return "\n".join(lines)


def plot(path: Path, points: list[Point], codecs: list[str], title: str) -> None:
    """x = bits per weight, y = perplexity: float_sparse as one line per (layout, rounding) through its
    sparsities, the dense model and llama.cpp's quantizations as labelled points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    for (layout, rounding), line in series(points, [SPARSE_LAYOUT, *codecs]).items():
        marker, colour = LAYOUT_STYLE.get(layout, ("x", None))
        style, said = ROUNDING_STYLE.get(rounding, ("-.", rounding))
        label = f"float_sparse, {'sparse layout' if layout == SPARSE_LAYOUT else layout}, {said}"
        ax.plot([b for b, _, _ in line], [p for _, p, _ in line], linestyle=style, marker=marker, color=colour,
                label=label)
        if layout == codecs[-1]:  # the sparsities written on one line per rounding: the leftmost, least crowded
            for bits, ppl, sparsity in line:
                ax.annotate(f"{sparsity:.0%}", (bits, ppl), textcoords="offset points", xytext=(-4, 6), ha="right",
                            fontsize=8, color="dimgray")
    for p in points:
        if p.config == "llama.cpp F16":
            continue  # on top of dense fp16; the table gives it
        if p.config.startswith("llama.cpp") or p.config == "dense fp16":
            bits = p.bits["own"]
            ax.scatter([bits], [p.ppl], marker="*" if p.config == "dense fp16" else "P", s=140, color="black",
                       zorder=3)
            ax.annotate(f"{p.config}\n{p.ppl:.2f} at {bits:.2f} bits", (bits, p.ppl), textcoords="offset points",
                        xytext=(0, 10), ha="center", fontsize=8)
    ax.set_xlabel("bits per weight of the per-layer matrices (attention + MLP)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title, fontsize=11)
    ax.set_xlim(0, 18)
    ax.margins(y=0.12)  # room for the labels above the highest and lowest points
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def series(points: list[Point], layouts: list[str]) -> dict[tuple[str, str], list[tuple[float, float, float]]]:
    """(layout, rounding) -> [(bits, ppl, sparsity)] of the float_sparse points, in order of sparsity: the lines
    of the plot."""
    lines: dict[tuple[str, str], list] = {}
    for p in sorted((p for p in points if p.rounding is not None), key=lambda p: p.sparsity):
        for layout in layouts:
            if layout in p.bits:
                lines.setdefault((layout, p.rounding), []).append((p.bits[layout], p.ppl, p.sparsity))
    return lines


# ------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python bench/quality.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  make bench-quality      # the full run (~20 min on 2 cores), writes BENCHMARKS.md and the plot\n"
               "  .venv/bin/python bench/quality.py --sparsities 0.5 --roundings l2 --windows 2 --seqlen 128 \\\n"
               "      --calib_samples 2 --plot /tmp/q.png          # a quick try; prints the section only")
    p.add_argument("--out", type=Path, default=None, help="write the 'quality' section of this markdown file "
                   "(e.g. BENCHMARKS.md); default: print it")
    p.add_argument("--plot", type=Path, default=PLOT, help=f"PNG to write (default: {PLOT.relative_to(REPO)})")
    p.add_argument("--no_plot", action="store_true", help="skip the plot (no matplotlib needed)")
    p.add_argument("--work", type=Path, default=REPO / "out" / "bench-quality",
                   help="cache of pruned/compressed folders and GGUFs (default: out/bench-quality)")
    p.add_argument("--model", type=Path, default=None, help="dense fp16 folder (default: the demo model)")
    p.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES),
                   help="float_sparse sparsities (default: 0.3 0.4 0.5)")
    p.add_argument("--roundings", nargs="+", choices=ROUNDINGS, default=list(ROUNDINGS),
                   help="sparsify --rounding settings (default: l2 none)")
    p.add_argument("--codecs", nargs="+", default=list(CODECS), help="compress --codec values (default: nibble-v3 "
                   "huff-v2)")
    p.add_argument("--calib", type=Path, default=None, help="calibration text (default: $SPARSEZIP_AUSTEN/emma.txt)")
    p.add_argument("--calib_samples", type=int, default=16, help="calibration windows (default: 16)")
    p.add_argument("--calib_seqlen", type=int, default=256, help="tokens per calibration window (default: 256)")
    p.add_argument("--data", type=Path, default=None,
                   help="evaluation text (default: $SPARSEZIP_AUSTEN/prideprejudice.txt)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per evaluation window (default: 256)")
    p.add_argument("--windows", type=int, default=16, help="evaluation windows, the first ones (default: 16)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads for torch, sparsify/compress and llama.cpp (default: all CPUs)")
    p.add_argument("--no_llamacpp", action="store_true", help="skip the llama.cpp points (no .venv-peers needed)")
    return p


def resolve_inputs(ns: argparse.Namespace) -> None:
    """Fill in the demo model and the Austen files, and refuse a bad setting before anything long starts."""
    from sparsezip_demo.assets import austen_files, demo_model_dir

    ns.model = ns.model or demo_model_dir()
    ns.calib = ns.calib or austen_files(["emma"])[0]
    ns.data = ns.data or austen_files(["prideprejudice"])[0]
    if not all(0 < s < 1 for s in ns.sparsities):
        raise SystemExit("bench-quality: --sparsities must lie strictly between 0 and 1")
    if min(ns.windows, ns.seqlen, ns.calib_samples, ns.calib_seqlen, ns.threads) < 1 or not ns.codecs:
        raise SystemExit("bench-quality: counts must be >= 1 and --codecs must name one codec at least")
    if not ns.no_plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise SystemExit("bench-quality: the plot needs matplotlib (`.venv/bin/pip install matplotlib`, or "
                             "`make bench-quality`); --no_plot skips it") from None
    if not ns.no_llamacpp and not llamacpp.peer_python().exists():
        raise SystemExit("bench-quality: no .venv-peers for llama.cpp; run `python3 bench/llamacpp.py --setup` "
                         "once (tens of minutes) or pass --no_llamacpp")
    ns.plot = None if ns.no_plot else ns.plot


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    resolve_inputs(ns)
    # before torch and sparsezip's native kernels read it: --threads holds for everything in this process
    os.environ["OMP_NUM_THREADS"] = str(ns.threads)
    import torch

    from sparsezip.data import eval_windows, load_tokenizer

    torch.set_num_threads(ns.threads)
    windows = eval_windows(load_tokenizer(ns.model), [ns.data], ns.seqlen, ns.windows)
    progress(f"{len(windows)} windows of {ns.seqlen} tokens from {ns.data.name}; {ns.threads} thread(s)")
    dense_ppl = sparsezip_ppl(ns.model, windows)
    points = [Point("dense fp16", dense_ppl, {"own": 16.0})]
    progress(f"dense fp16: ppl {dense_ppl:.3f}")
    points += measure_float_sparse(ns, windows)
    f16_gap = None
    if not ns.no_llamacpp:
        peers = measure_llamacpp(ns, windows)
        f16_gap = relative_gap(next(p.ppl for p in peers if p.config == "llama.cpp F16"), dense_ppl)
        if abs(f16_gap) > AGREEMENT:
            progress(f"WARNING: llama.cpp F16 and sparsezip dense differ by {f16_gap:+.2%} in perplexity")
        points += peers
    text = report(ns, points, dense_ppl, f16_gap, len(windows))
    if ns.plot:
        plot(ns.plot, points, ns.codecs, f"{ns.model.name}: perplexity vs. bits per weight\n"
             f"({ns.data.stem}, {len(windows)} windows x {ns.seqlen} tokens; calibration {ns.calib.stem} "
             f"{ns.calib_samples} x {ns.calib_seqlen})")
        progress(f"wrote {ns.plot}")
    if ns.out:
        write_section(ns.out, "quality", text)
        progress(f"wrote the 'quality' section of {ns.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
