"""`sparsify`: prune a dense checkpoint layer by layer with calibration text, into a W16A16S folder.

Only one layer's weights are in memory at once, and finished tensors are written as they are produced, so
memory grows with one layer plus the calibration activations, not with the model. A layer keeps one
representation throughout, the model's own (q/k/v and gate/up fused): each Hugging Face matrix is a row range
of its fused weight (tp.source_rows), pruned in place, so later stages see exactly the fp16 weights that are
saved, and written out under its own name.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path
from typing import Callable

import psutil
import torch
from torch import nn
from tqdm import tqdm

from . import __version__
from .calibrate import (STAGES, Activations, LayerPass, embed_samples, load_layer, owl_allocation,
                        owl_outlier_ratios, read_layer)
from .checkpoint import ShardedWriter, TensorReader, atomic_output_dir, check_output_path, release_freed_memory, to_fp16
from .config import ModelArgs, SparsifyConfig, part_file_bytes
from .data import calibration_samples, load_tokenizer
from .errors import SparsezipError
from .formats import (FLOAT, SPARSE_STEM, Description, FolderKind, check_weights_match_config, copy_side_files,
                      detect_kind, weight_files, write_description, write_fp16_config)
from .pruners import LinearStats, Method, get_method
from .rounding import l2_round
from .tp import SplitRule, global_rules, layer_rules, source_rows

log = logging.getLogger("sparsezip")
TRIM_GROWTH = 1.5  # hand freed heap memory back once the resident size grew this much over its low (trim_if_grown)
DENSE_TARGET_TOKENS_PER_INPUT = 8


def fits_dense_target(tokens: int, in_features: int) -> bool:
    """Whether `--targets dense` fits a linear of `in_features` inputs to the dense model's outputs: only with at least
    DENSE_TARGET_TOKENS_PER_INPUT calibration tokens per input. With fewer, the fit follows differences between the
    pruned and dense inputs that hold on the calibration tokens alone, and the model came out worse than with the
    original fit (Qwen2.5-Coder-1.5B at 0.9 and 5.3 tokens per input, BENCHMARKS.md; the demo model gained at 10.7
    and more): such a linear keeps the original fit."""
    return tokens >= DENSE_TARGET_TOKENS_PER_INPUT * in_features


def linears_without_dense_target(args: ModelArgs, tokens: int) -> list[str]:
    """The stages whose linears keep the original fit under `--targets dense` with this many calibration tokens."""
    inputs = {"self_attn.qkv_proj": args.hidden_size, "self_attn.o_proj": args.num_heads * args.head_dim,
              "mlp.gate_up_proj": args.hidden_size, "mlp.down_proj": args.intermediate_size}
    return [stage for stage in STAGES if not fits_dense_target(tokens, inputs[stage])]


def prune_linear(linear: nn.Linear, rule: SplitRule, stats: LinearStats | None, config: SparsifyConfig,
                 method: Method, sparsity: float, args: ModelArgs) -> dict[str, torch.Tensor]:
    """Prune each Hugging Face matrix inside a fused linear, in place; returns {HF name: fp16 weight}.

    Row-local methods prune the fused matrix in one call (identical per row, fewer passes); the others rank
    over each matrix, so q, k and v (gate and up) are pruned one by one.
    """
    weight = linear.weight.data  # fp16 [out, in] (calibrate.HeldLinear)
    rows = source_rows(rule, args)
    # row-local methods take the fused matrix in one call; the others take q, k and v (gate and up) one by one,
    # sharing the statistics, so only the last call may take over their Hessian
    calls = [("fused", slice(None))] if method.row_local else rows
    pruned = {}
    for i, (label, sl) in enumerate(calls):
        if stats is not None:
            stats.last_use = i == len(calls) - 1
        dense_fit = stats is not None and stats.dense_target is not None  # only where dense_target_stages said
        fit = {"dense_target": stats.dense_target[:, sl], "target_blend": config.target_blend} if dense_fit else {}
        if config.method == "float_sparse":
            fit["rho"] = config.admm_rho
            fit["row_masks"] = config.mask_scope == "row"
            fit["damp"] = config.admm_damp
            fit["mask_score"] = config.mask_score
        pruned[label] = method.prune(weight[sl], stats, sparsity, config.nm, **fit).to(torch.float16)
    parts = {name: pruned["fused"][sl] for name, sl in rows} if method.row_local else pruned
    if config.rounding_mode == "l2":  # "the 2% of the matrix" is counted per Hugging Face matrix
        norm = stats.sq_norm.sqrt() if stats is not None else torch.ones(weight.shape[1], device=weight.device)
        parts = {name: l2_round(w.contiguous(), norm) for name, w in parts.items()}
    for name, sl in rows:
        weight[sl] = parts[name]
    return {name: w.contiguous().clone() for name, w in parts.items()}


def prune_layer(args: ModelArgs, index: int, layer: nn.Module, acts: Activations, run: LayerPass | None,
                config: SparsifyConfig, method: Method, sparsity: float,
                save: Callable[[str, torch.Tensor], None]) -> Activations:
    """Prune the 7 linears of one layer, handing each HF-named fp16 weight to `save` as soon as it is pruned (not
    held until the layer ends: they would sit beside the down projection's Hessian, at sparsify's peak); returns
    the layer's pruned output."""
    rules = {r.target: r for r in layer_rules(args, index)}

    def on_linear(stage: str, linear: nn.Linear, stats: LinearStats | None) -> None:
        rule = rules[f"model.layers.{index}.{stage}.weight"]
        for name, weight in prune_linear(linear, rule, stats, config, method, sparsity, args).items():
            save(name, weight)

    if run is None:  # uncalibrated (magnitude): no activations to propagate
        for stage in STAGES:
            on_linear(stage, layer.get_submodule(stage), None)
        return acts
    return run(layer, acts, on_linear, last=index == args.num_layers - 1)


def unpruned_tensors(args: ModelArgs, index: int, fused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The layer's norms and biases under their Hugging Face names, saved unchanged."""
    return {name: fused[rule.target][sl].clone() for rule in layer_rules(args, index) if not rule.compressed
            for name, sl in source_rows(rule, args)}


def trim_if_grown(low: int | None) -> int:
    """Hand freed heap memory back to the OS (release_freed_memory) when the resident size after a layer is
    TRIM_GROWTH times its lowest so far; returns the new low. glibc keeps freed memory for reuse, which is fine as
    long as it does not creep, and trimming after every layer costs the page faults of taking the memory back."""
    rss = psutil.Process().memory_info().rss
    if low is not None and rss > TRIM_GROWTH * low:
        release_freed_memory()
        rss = psutil.Process().memory_info().rss
    return rss if low is None else min(low, rss)


def calibration_batches(model_path: Path, reader: TensorReader, config: SparsifyConfig) -> tuple[list, int, int]:
    """(embedded calibration batches, tokens, samples) for a calibrated method."""
    samples = calibration_samples(load_tokenizer(model_path), list(config.calib), config.calib_samples,
                                  config.calib_seqlen, config.seed)
    tokens = sum(len(s) for s in samples)
    if tokens < 2048:
        log.warning("only %d calibration tokens; at least 2048 are recommended (the inverse can fail)", tokens)
    hidden = embed_samples(reader, samples)
    release_freed_memory()  # the tokenizer's heap (0.1-0.2 GB for a 150k vocabulary) stays resident otherwise
    return hidden, tokens, len(samples)


def dense_target_stages(args: ModelArgs, config: SparsifyConfig, tokens: int) -> tuple[str, ...]:
    """The stages whose linears fit the dense model's outputs (with any, the dense activations travel beside the
    pruned ones); says which linears keep the original fit under `--targets dense`."""
    if config.targets != "dense":
        return ()
    local = linears_without_dense_target(args, tokens)
    if local:
        log.warning("--targets dense: %s keep%s the original fit: %d calibration tokens are fewer than %d per input; "
                    "more calibration tokens (--calib_samples, --calib_seqlen) fit %s to the dense outputs",
                    ", ".join(local), "s" * (len(local) == 1), tokens, DENSE_TARGET_TOKENS_PER_INPUT,
                    "it" if len(local) == 1 else "them")
    return tuple(stage for stage in STAGES if stage not in local)


def sparsify(model_path: Path, save_path: Path, config: SparsifyConfig = SparsifyConfig(),
             overwrite: bool = False) -> Path:
    """Prune the 7 linears of every decoder layer of a dense checkpoint and save a W16A16S folder."""
    model_path, save_path = Path(model_path), Path(save_path)
    if detect_kind(model_path) != FolderKind.DENSE:
        raise SparsezipError(f"{model_path} is already sparse; sparsify takes a dense Hugging Face folder")
    check_output_path(save_path, overwrite, (model_path, *config.calib))  # fail now, not after calibration
    args = ModelArgs.from_dir(model_path)
    config = config.checked(args)
    method = get_method(config.method)
    reader = TensorReader(weight_files(model_path))
    check_weights_match_config(reader, args, model_path)
    hidden, tokens, n_samples = [], 0, 0
    if method.calibrated:
        hidden, tokens, n_samples = calibration_batches(model_path, reader, config)
    layer_sparsity = [config.sparsity] * args.num_layers
    if config.owl is not None:
        ratios = owl_outlier_ratios(args, reader, hidden, config.device, config.owl.threshold)
        layer_sparsity = owl_allocation(ratios, config.sparsity, config.owl.lam)
    dense_stages = dense_target_stages(args, config, tokens)
    run = LayerPass(args, config.device, method.needs_hessian, dense_stages) if method.calibrated else None
    acts = Activations(hidden, list(hidden) if dense_stages else None)  # two lists: each pass empties its own
    del hidden  # the first layer's pass may drop the embedded batches
    with atomic_output_dir(save_path, overwrite, inputs=(model_path, *config.calib)) as tmp:
        writer = ShardedWriter(tmp, SPARSE_STEM, part_file_bytes(config.part_file_size))
        description = Description(FolderKind.W16A16S)

        def save(name: str, tensor: torch.Tensor, kind: str = FolderKind.W16A16S.value) -> None:
            writer.add(name, tensor.cpu())
            description.add(name, kind)

        low_rss = None
        for i in tqdm(range(args.num_layers), desc=f"sparsify {config.method}", unit="layer"):
            fused = read_layer(args, reader, i)
            layer = load_layer(args, fused, i, config.device)
            unpruned = unpruned_tensors(args, i, fused)
            del fused  # the layer holds the weights now (the same fp16 tensors): one copy
            acts = prune_layer(args, i, layer, acts, run, config, method, layer_sparsity[i], save)
            for name, t in unpruned.items():
                save(name, t, FLOAT)
            del layer, unpruned
            low_rss = trim_if_grown(low_rss)
        release_freed_memory()  # the layers' freed heap, before the embedding table (0.5-1 GB) comes in whole
        for rule in global_rules(args):
            writer.add(rule.target, to_fp16(rule.target, reader.get(rule.target)))
            description.add(rule.target, FLOAT)
        writer.close()
        provenance = {"source": model_path.resolve().name, "tool": f"sparsezip {__version__}",
                      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        description.metadata = config.metadata(tokens, n_samples, layer_sparsity, provenance)
        if config.targets == "dense":  # the linears that kept the original fit
            description.metadata["local_fit"] = [stage for stage in STAGES if stage not in dense_stages]
        write_description(tmp, description)
        write_fp16_config(model_path, tmp, FolderKind.W16A16S)
        copy_side_files(model_path, tmp)
    return save_path
