"""How much of a baseline pruner's perplexity gap to dense a candidate closes, with a confidence interval
(`python bench/gap_closed.py`).

The scale protocol scores 8 windows; a difference of a few hundredths of perplexity is then within the noise of
which text the windows hold. Here every folder is scored on the same first K windows of one text, and the share of
the baseline's gap that a candidate closes, (ppl_base - ppl_cand) / (ppl_base - ppl_dense), gets a 95% interval
from a paired bootstrap over the windows: each resample draws K windows with replacement and takes the same draw
for every folder, so what the folders share (hard and easy passages) cancels out.

    python bench/gap_closed.py --dense DENSE --baseline SPARSEGPT --candidates FS1 FS2 --data prideprejudice.txt \\
        --seqlen 512 --max_windows 32 --json out/gap_closed.json

A later comparison against the same dense and baseline folders can take their losses from that file instead of
scoring them again (`--reuse out/gap_closed.json`): on a 1.5B model each folder takes minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from sparsezip.config import ModelArgs  # noqa: E402
from sparsezip.data import auto_tokenizer, eval_windows  # noqa: E402
from sparsezip.errors import SparsezipError  # noqa: E402
from sparsezip.evaluate import check_eval_settings, window_losses  # noqa: E402
from sparsezip.runtime import load_model  # noqa: E402

FIRST_WINDOWS = 8  # the scale protocol's windows, reported beside the whole set


def folder_losses(folder: Path, data: Path, seqlen: int, windows: int, batch_size: int) -> torch.Tensor:
    """Per-window mean loss of one folder, float64 [K]; its model is freed before the next one loads."""
    tokens = eval_windows(auto_tokenizer(folder), [data], seqlen, windows)
    model = load_model(folder, weights="dense")
    return window_losses(model, tokens, batch_size)


def perplexity(losses: torch.Tensor) -> torch.Tensor:
    """exp of the mean over the last axis: windows of equal length, so the perplexity of their tokens."""
    return losses.mean(-1).exp()


def share_closed(dense, base, cand):
    """The share of the baseline's perplexity gap to dense that the candidate closes, from three perplexities
    (floats or tensors): (base - cand) / (base - dense)."""
    return (base - cand) / (base - dense)


def gap_closed(dense: torch.Tensor, base: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """share_closed of the perplexities of per-window losses, over the last axis."""
    return share_closed(perplexity(dense), perplexity(base), perplexity(cand))


def bootstrap_interval(dense: torch.Tensor, base: torch.Tensor, cand: torch.Tensor, resamples: int,
                       seed: int = 0) -> tuple[float, float]:
    """The 2.5th and 97.5th percentiles of gap_closed over paired resamples of the windows."""
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(dense), (resamples, len(dense)), generator=g)  # the same draw for every folder
    shares = gap_closed(dense[picks], base[picks], cand[picks])
    low, high = torch.quantile(shares, torch.tensor([0.025, 0.975], dtype=shares.dtype)).tolist()
    return low, high


def reusable_losses(path: Path | None, data: Path, seqlen: int, windows: int) -> dict[str, torch.Tensor]:
    """The per-window losses that an earlier run's --json holds for the same text, window length and at least as
    many windows (the first `windows` of them: the windows are the text's first ones, so the same)."""
    if path is None:
        return {}
    try:
        saved = json.loads(path.read_text())
        if saved["data"] != str(data) or saved["seqlen"] != seqlen:
            return {}
        return {name: torch.tensor(values[:windows], dtype=torch.float64)
                for name, values in saved["losses"].items() if len(values) >= windows}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"gap_closed: --reuse {path}: not a --json file of this script ({e})") from None


def report(names: list[str], losses: dict[str, torch.Tensor], resamples: int) -> str:
    """Markdown: each folder's perplexity on all windows and on the first 8, then each candidate's share."""
    dense, base, *candidates = names
    k = len(losses[dense])
    lines = [f"| folder | perplexity, {k} windows | first {FIRST_WINDOWS} windows |", "|---|---|---|"]
    for name in names:
        lines.append(f"| {name} | {float(perplexity(losses[name])):.3f} | "
                     f"{float(perplexity(losses[name][:FIRST_WINDOWS])):.3f} |")
    lines += ["", f"| candidate | share of {base}'s gap to {dense} closed, {k} windows | 95% interval "
              f"(paired bootstrap, {resamples} resamples) | first {FIRST_WINDOWS} windows |", "|---|---|---|---|"]
    for name in candidates:
        share = float(gap_closed(losses[dense], losses[base], losses[name]))
        low, high = bootstrap_interval(losses[dense], losses[base], losses[name], resamples)
        first = float(gap_closed(*(losses[n][:FIRST_WINDOWS] for n in (dense, base, name))))
        lines.append(f"| {name} | {share:.1%} | {low:.1%} to {high:.1%} | {first:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dense", type=Path, required=True, help="the unpruned folder")
    p.add_argument("--baseline", type=Path, required=True, help="the pruned folder whose gap is measured")
    p.add_argument("--candidates", type=Path, nargs="+", required=True, help="pruned folders to compare")
    p.add_argument("--data", type=Path, required=True, help=".txt file the windows come from")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max_windows", type=int, default=32, help="the first N windows of --seqlen tokens")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--resamples", type=int, default=10000)
    p.add_argument("--json", type=Path, help="also write every folder's per-window losses here")
    p.add_argument("--reuse", type=Path, help="take the losses of folders already scored on the same windows from "
                   "this earlier --json file (only if the folders have not changed since)")
    args = p.parse_args(argv)
    folders = [args.dense, args.baseline, *args.candidates]
    names = [str(f) for f in folders]
    if len(set(names)) != len(names):
        raise SystemExit("gap_closed: each folder may be named once")
    for folder in folders:
        if not (folder / "config.json").is_file():
            raise SystemExit(f"gap_closed: {folder} is not a model folder (no config.json)")
    if not args.data.is_file():
        raise SystemExit(f"gap_closed: {args.data}: no such text file")
    try:
        check_eval_settings(ModelArgs.from_dir(args.dense), args.seqlen, args.batch_size, args.max_windows)
    except SparsezipError as e:
        raise SystemExit(f"gap_closed: {e}") from None
    reused = reusable_losses(args.reuse, args.data, args.seqlen, args.max_windows)
    losses = {}
    for name, folder in zip(names, folders):
        if name in reused:
            print(f"{name}: losses from {args.reuse}", file=sys.stderr)
            losses[name] = reused[name]
            continue
        print(f"scoring {name}", file=sys.stderr)
        try:
            losses[name] = folder_losses(folder, args.data, args.seqlen, args.max_windows, args.batch_size)
        except SparsezipError as e:
            raise SystemExit(f"gap_closed: {folder}: {e}") from None
    if any(not math.isfinite(float(v.sum())) for v in losses.values()):
        raise SystemExit("gap_closed: a folder gave a non-finite loss")
    print(report(names, losses, args.resamples))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")  # renamed once whole: never a half-written file
        tmp.write_text(json.dumps({"data": str(args.data), "seqlen": args.seqlen,
                                   "losses": {n: v.tolist() for n, v in losses.items()}}, indent=1))
        os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
