"""Held-out output error of pruning methods on chosen layers of a real model (`python bench/layer_error.py`).

A perplexity needs a whole sparsify run (about an hour for a 1.5B model on 2 cores); one layer's linears take
minutes here. The dense model runs over calibration text and over held-out text while hooks keep the inputs of
every linear in the chosen layers. Each method prunes each linear from its calibration inputs, and the table gives,
on the held-out inputs X, the relative output error ||X (W' - W)^T||^2 / ||X W^T||^2 and, in brackets, the worst
output channel's error relative to that channel's own output.

The inputs are the dense model's, so errors do not carry from layer to layer as they do in sparsify: this screens
pruner settings, it does not predict a perplexity.

Methods: `sparsegpt`, `wanda`, `magnitude`, or `float_sparse` with optional settings after a colon, e.g.
`float_sparse:rho=0.6,mask_scope=row,damp=0.1,iters=20,mask_iters=15,mask_score=obs` (damp=auto: as `sparsify
--admm_damp auto`; mask_score: as `sparsify --mask_score`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from sparsezip.data import calibration_samples, eval_windows, load_tokenizer  # noqa: E402
from sparsezip.errors import SparsezipError  # noqa: E402
from sparsezip.pruners import MASK_SCORES, LinearStats, damping_setting, get_method  # noqa: E402

# a layer's linears, grouped by the input they share (q, k and v read the same input; so do gate and up)
SHARED_INPUTS = {
    "self_attn.q_proj": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    "self_attn.o_proj": ["self_attn.o_proj"],
    "mlp.gate_proj": ["mlp.gate_proj", "mlp.up_proj"],
    "mlp.down_proj": ["mlp.down_proj"],
}
def mask_score_setting(text: str) -> str:
    if text not in MASK_SCORES:
        raise ValueError(f"mask_score is one of {', '.join(MASK_SCORES)}")
    return text


FLOAT_SPARSE_SETTINGS = {"rho": float, "damp": damping_setting, "iters": int, "mask_iters": int,
                         "mask_score": mask_score_setting}
STATS_BATCH = 1024  # tokens per Hessian update


def parse_method(spec: str) -> tuple[str, dict]:
    """'float_sparse:rho=0.6,mask_scope=row' -> ('float_sparse', {'rho': 0.6, 'row_masks': True})."""
    name, _, settings = spec.partition(":")
    try:
        get_method(name)  # unknown names fail here, before the model loads
    except SparsezipError as e:
        raise SystemExit(f"{spec}: {e}") from None
    kwargs = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        if name != "float_sparse":
            raise SystemExit(f"{spec}: only float_sparse takes settings")
        if key == "mask_scope" and value in ("row", "matrix"):
            kwargs["row_masks"] = value == "row"
        elif key in FLOAT_SPARSE_SETTINGS:
            try:
                kwargs[key] = FLOAT_SPARSE_SETTINGS[key](value)
            except (ValueError, SparsezipError) as e:
                raise SystemExit(f"{spec}: bad value in {item!r}: {e}") from None
        else:
            raise SystemExit(f"{spec}: unknown setting {item!r}; float_sparse takes mask_scope=row|matrix and "
                             + ", ".join(FLOAT_SPARSE_SETTINGS))
    return name, kwargs


class LastLayerDone(Exception):
    """Raised after the last chosen layer: the layers above it and the head need not run."""


def stop_forward(*_):
    raise LastLayerDone


def capture_inputs(model, layers: list[int], samples) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, linear): its inputs over all samples [tokens, in]} for the first linear of each shared input."""
    store = {(layer, name): [] for layer in layers for name in SHARED_INPUTS}
    hooks = [model.model.layers[max(layers)].register_forward_hook(stop_forward)]
    for layer, name in store:
        module = model.model.layers[layer].get_submodule(name)
        hooks.append(module.register_forward_hook(
            lambda _m, inputs, _out, key=(layer, name): store[key].append(inputs[0][0].detach())))
    try:
        with torch.no_grad():
            for sample in tqdm(samples, desc="dense forward", unit="sample", leave=False):
                try:
                    model(torch.as_tensor(sample)[None], use_cache=False)
                except LastLayerDone:
                    pass
    finally:
        for hook in hooks:
            hook.remove()
    return {key: torch.cat(parts) for key, parts in store.items()}


def held_out_error(w: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    """(relative output error, worst output channel's relative error) on the inputs x [tokens, in]."""
    ref = x @ w.T
    err = x @ pruned.float().T - ref
    per_channel = err.square().sum(0) / ref.square().sum(0).clamp_min(1e-30)
    return float(err.square().sum() / ref.square().sum()), float(per_channel.max())


def input_stats(calib_x: torch.Tensor) -> LinearStats:
    """One linear input's statistics, Hessian included, for every method: no pruner call takes them over
    (`last_use` stays False), so the linears that share the input and every method reuse them."""
    stats = LinearStats(calib_x.shape[1], calib_x.device, hessian=True)
    for i in range(0, calib_x.shape[0], STATS_BATCH):
        stats.add_batch(calib_x[i:i + STATS_BATCH])
    return stats


def prune_once(spec: str, w: torch.Tensor, stats: LinearStats, sparsity: float) -> torch.Tensor:
    name, kwargs = parse_method(spec)
    return get_method(name).prune(w, stats, sparsity, None, **kwargs)


def error_table(model, layers: list[int], methods: list[str], calib_x, held_x, sparsity: float) -> str:
    jobs = [(layer, source, linear) for layer in layers for source, linears in SHARED_INPUTS.items()
            for linear in linears]
    rows, totals, stats = [], {spec: [] for spec in methods}, {}
    for layer, source, linear in tqdm(jobs, desc="prune", unit="linear"):
        w = model.model.layers[layer].get_submodule(linear).weight.data.float()
        if (layer, source) not in stats:
            stats = {(layer, source): input_stats(calib_x[(layer, source)])}  # one shared input at a time
        cells = []
        for spec in methods:
            rel, worst = held_out_error(w, prune_once(spec, w, stats[(layer, source)], sparsity),
                                        held_x[(layer, source)])
            totals[spec].append(rel)
            cells.append(f"{rel:.5f} ({worst:.3f})")
        rows.append(f"| {layer} | {linear.split('.')[-1]} | " + " | ".join(cells) + " |")
    means = [sum(v) / len(v) for v in totals.values()]
    rows.append("| mean | | " + " | ".join(f"**{m:.5f}** ({m / means[0]:.2f}x)" for m in means) + " |")
    head = "| layer | linear | " + " | ".join(f"`{m}`" for m in methods) + " |"
    return "\n".join([head, "|" + "---|" * (len(methods) + 2)] + rows)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model_path", type=Path, required=True, help="a Hugging Face folder (fp16 or fp32)")
    p.add_argument("--layers", default="10", help="comma-separated layer indices")
    p.add_argument("--methods", default="sparsegpt;float_sparse;float_sparse:rho=0.6,mask_scope=row",
                   help="methods separated by ';' (a float_sparse spec separates its settings by ',')")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--calib", type=Path, nargs="+", required=True, help="calibration text files")
    p.add_argument("--calib_samples", type=int, default=32)
    p.add_argument("--calib_seqlen", type=int, default=256)
    p.add_argument("--held_out", type=Path, required=True, help="held-out text file (first windows are used)")
    p.add_argument("--held_out_windows", type=int, default=16)
    args = p.parse_args(argv)
    methods = args.methods.split(";")
    for spec in methods:
        parse_method(spec)
    try:
        layers = [int(i) for i in args.layers.split(",")]
    except ValueError:
        raise SystemExit(f"--layers {args.layers!r}: give comma-separated layer indices, e.g. 0,10") from None
    from transformers import AutoModelForCausalLM  # imported late: --help and bad specs answer at once
    try:
        tokenizer = load_tokenizer(args.model_path)
        calib = calibration_samples(tokenizer, args.calib, args.calib_samples, args.calib_seqlen)
        held = eval_windows(tokenizer, [args.held_out], args.calib_seqlen, args.held_out_windows)
    except (SparsezipError, OSError) as e:
        raise SystemExit(f"layer_error: {e}") from None
    model = AutoModelForCausalLM.from_pretrained(args.model_path, dtype=torch.float32).eval()
    if not all(0 <= i < len(model.model.layers) for i in layers):
        raise SystemExit(f"--layers {args.layers}: this model has layers 0 to {len(model.model.layers) - 1}")
    table = error_table(model, layers, methods, capture_inputs(model, layers, calib),
                        capture_inputs(model, layers, held), args.sparsity)
    print(f"{args.model_path.name}, {args.sparsity:.0%}: held-out relative output error (worst output channel); "
          f"calibration {len(calib)} x {args.calib_seqlen} tokens, held-out {held.shape[0]} x {held.shape[1]}\n")
    print(table)


if __name__ == "__main__":
    main()
