"""`sparsify`: prune a dense checkpoint layer by layer with calibration text, into a W16A16S folder.

Sequential calibration with one forward pass per layer: the calibration activations go through a
layer stage by stage (q/k/v, then o, then gate/up, then down); each linear's statistics come from
inputs that already passed through the *pruned* linears before it, the linear is pruned, and the
stage's output feeds the next stage. The layer's pruned output is the next layer's input. Only one
layer's weights are in memory at once, and finished tensors are written as they are produced, so
memory grows with one layer plus the calibration activations, not with the model.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import psutil
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import __version__
from .checkpoint import (DESCRIPTION, FORMAT_VERSION, HF, SPARSE_STEM, W16A16S, ShardedWriter, TensorReader,
                         atomic_output_dir, check_output_path, copy_side_files, detect_kind, release_freed_memory,
                         safetensors_files, to_fp16, write_fp16_config)
from .config import ModelArgs, write_json
from .data import calibration_samples, load_tokenizer
from .errors import SparsezipError
from .masks import parse_pattern
from .model import DecoderLayer, attention_mask, rope_cos_sin
from .pruners import LinearStats, Method, get_method
from .rounding import l2_round
from .tp import PRUNABLE_SUFFIXES, Dist, SplitRule, global_rules, layer_rules, shard, unfuse

log = logging.getLogger("sparsezip")
# Calibration samples per batch. 4 x 512 tokens keeps every activation (gate/up's output included: 2048 x 3072
# fp32 = 25 MB) under glibc's 32 MB mmap ceiling, so freed buffers are reused instead of mapped and zeroed afresh:
# SparseGPT on the demo model took 64 s against 71-75 s with 8 (0.6-0.7M page faults against 2.4-2.7M).
SAMPLES_PER_BATCH = 4
TRIM_GROWTH = 1.5  # hand freed heap memory back once the resident size grew this much over its low (trim_if_grown)
ATTENTION_CHUNK = 64  # queries per attention call: causal chunks skip masked scores (model.attend); 64 beat 128 by ~10%
PruneHook = Callable[[str, nn.Linear, LinearStats], None]


@dataclass(frozen=True)
class PruneSettings:
    method_name: str
    method: Method
    pattern: tuple[int, int] | None
    rounding: str  # "l2" or "none"


def load_layer(args: ModelArgs, state: dict[str, torch.Tensor], index: int, device: str) -> DecoderLayer:
    """A tp=1 decoder layer in fp32 from its fused fp16 tensors (keys with the layer prefix)."""
    with torch.device("meta"):
        layer = DecoderLayer(args, Dist())
    prefix = f"model.layers.{index}."
    local = {k[len(prefix):]: v.to(device=device, dtype=torch.float32) for k, v in state.items()}
    layer.load_state_dict(local, strict=True, assign=True)
    return layer.eval()


def batches(samples: list[torch.Tensor]) -> Iterator[list[int]]:
    """Indices of up to SAMPLES_PER_BATCH consecutive samples of equal length (jsonl samples vary)."""
    group: list[int] = []
    for i, s in enumerate(samples):
        if group and (len(group) == SAMPLES_PER_BATCH or s.shape[0] != samples[group[0]].shape[0]):
            yield group
            group = []
        group.append(i)
    if group:
        yield group


class LayerPass:
    """Runs calibration batches ([B, L, hidden] each) through one layer stage by stage, on `device`, keeping
    activations on the CPU. The batches are formed once (embed_samples) and never restacked."""

    def __init__(self, args: ModelArgs, device: str, needs_hessian: bool):
        self.args, self.device, self.needs_hessian = args, device, needs_hessian

    def apply(self, fn: Callable[..., torch.Tensor], *inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [fn(*(x.to(self.device) for x in xs)).cpu() for xs in zip(*inputs)]

    def stats(self, linear: nn.Linear, inputs: list[torch.Tensor]) -> LinearStats:
        stats = LinearStats(linear.in_features, self.device, hessian=self.needs_hessian)
        for x in inputs:
            stats.add_batch(x.to(self.device))
        return stats

    def rope_and_mask(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = torch.arange(h.shape[1], device=h.device)
        cos, sin = rope_cos_sin(self.args, pos, h.dtype)
        return cos, sin, attention_mask(self.args, pos, h.shape[1])

    @torch.no_grad()
    def __call__(self, layer: DecoderLayer, hidden: list[torch.Tensor], on_linear: PruneHook,
                 last: bool = False) -> list[torch.Tensor]:
        """hidden: batches [B, L, hidden] -> the layer's output batches; `on_linear` may prune in place.
        `last`: the model's final layer, whose output nothing reads: no down_proj forward, and [] returned."""
        attn, mlp = layer.self_attn, layer.mlp

        def attend(h: torch.Tensor) -> torch.Tensor:
            return attn.attend(attn.qkv_proj(h), *self.rope_and_mask(h), None, query_chunk=ATTENTION_CHUNK)

        normed = self.apply(layer.input_layernorm, hidden)
        on_linear("self_attn.qkv_proj", attn.qkv_proj, self.stats(attn.qkv_proj, normed))
        attended = self.apply(attend, normed)
        del normed
        on_linear("self_attn.o_proj", attn.o_proj, self.stats(attn.o_proj, attended))
        # residual sums in place into the fresh linear output (y + x and x + y are the same floats)
        resid = self.apply(lambda x, a: attn.o_proj(a).add_(x), hidden, attended)
        del attended
        normed = self.apply(layer.post_attention_layernorm, resid)
        on_linear("mlp.gate_up_proj", mlp.gate_up_proj, self.stats(mlp.gate_up_proj, normed))
        act = self.apply(lambda h: mlp.activate(mlp.gate_up_proj(h)), normed)
        del normed
        on_linear("mlp.down_proj", mlp.down_proj, self.stats(mlp.down_proj, act))
        if last:
            return []
        return self.apply(lambda r, a: mlp.down_proj(a).add_(r), resid, act)


def prune_linear(rule: SplitRule, weight: torch.Tensor, stats: LinearStats | None, settings: PruneSettings,
                 sparsity: float, args: ModelArgs) -> dict[str, torch.Tensor]:
    """Prune each Hugging Face matrix inside a fused weight; returns {HF name: fp16 weight}.

    Row-local methods prune the fused matrix in one call (identical per row, fewer passes); the others
    rank over each matrix, so q, k and v (gate and up) are pruned one by one.
    """
    method = settings.method
    if method.row_local:
        fused = method.prune(weight.float(), stats, sparsity, settings.pattern).to(torch.float16)
        parts = unfuse(rule, fused, args)
    else:
        parts = {name: method.prune(w.float(), stats, sparsity, settings.pattern).to(torch.float16)
                 for name, w in unfuse(rule, weight, args).items()}
    if settings.rounding == "l2":  # "the 2% of the matrix" is counted per Hugging Face matrix
        norm = stats.sq_norm.sqrt() if stats is not None else torch.ones(weight.shape[1], device=weight.device)
        parts = {name: l2_round(w.contiguous(), norm) for name, w in parts.items()}
    return {name: w.contiguous() for name, w in parts.items()}


def layer_rule(args: ModelArgs, layer: int, linear: str) -> SplitRule:
    target = f"model.layers.{layer}.{linear}.weight"
    return next(r for r in layer_rules(args, layer) if r.target == target)


def prune_layer(args: ModelArgs, index: int, layer: DecoderLayer, hidden: list[torch.Tensor], run: LayerPass | None,
                settings: PruneSettings, sparsity: float) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Prune the 7 linears of one layer; returns their HF-named fp16 weights and the layer's pruned output."""
    pruned: dict[str, torch.Tensor] = {}

    def on_linear(linear_name: str, linear: nn.Linear, stats: LinearStats | None) -> None:
        rule = layer_rule(args, index, linear_name)
        parts = prune_linear(rule, linear.weight.data, stats, settings, sparsity, args)
        pruned.update(parts)
        # later stages must see exactly the fp16 weights that are saved
        linear.weight.data = torch.cat(list(parts.values()), dim=rule.dim or 0).to(linear.weight)

    if run is None:  # uncalibrated (magnitude): no activations to propagate
        for linear_name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            on_linear(linear_name, layer.get_submodule(linear_name), None)
        return pruned, hidden
    return pruned, run(layer, hidden, on_linear, last=index == args.num_layers - 1)


def trim_if_grown(low: int | None) -> int:
    """Hand freed heap memory back to the OS (release_freed_memory) when the resident size after a layer is
    TRIM_GROWTH times its lowest so far; returns the new low. glibc keeps freed memory for reuse, which is fine as
    long as it does not creep: trimming after every layer cost ~65 ms plus the page faults of taking the memory
    back (2 s on the demo model, 10 s on the 1.5 GB memory-test model) and lowered no measured peak."""
    rss = psutil.Process().memory_info().rss
    if low is not None and rss > TRIM_GROWTH * low:
        release_freed_memory()
        rss = psutil.Process().memory_info().rss
    return rss if low is None else min(low, rss)


def owl_allocation(outlier_ratios: list[float], sparsity: float, lam: float) -> list[float]:
    """OWL (Yin et al. 2024): layers with more outliers get less sparsity, within sparsity ± lam, mean kept."""
    r = torch.tensor(outlier_ratios, dtype=torch.float64)
    spread = r.max() - r.min()
    r = (r - r.min()) / spread * 2 * lam if spread > 0 else torch.zeros_like(r)
    return (sparsity - (r - r.mean())).tolist()


def owl_outlier_ratios(args: ModelArgs, reader: TensorReader, hidden: list[torch.Tensor], run: LayerPass,
                       device: str, threshold: float) -> list[float]:
    """Share of Wanda scores above `threshold` x their layer mean, per layer, on the dense model."""
    ratios = []
    for i in tqdm(range(args.num_layers), desc="OWL outlier scan", unit="layer"):
        layer = load_layer(args, read_layer(args, reader, i), i, device)
        scores: list[torch.Tensor] = []

        def record(_name: str, linear: nn.Linear, stats: LinearStats) -> None:
            scores.append((linear.weight.abs() * stats.sq_norm.sqrt().to(linear.weight)[None, :]).flatten())

        hidden = run(layer, hidden, record, last=i == args.num_layers - 1)
        flat = torch.cat(scores)
        ratios.append(float((flat > threshold * flat.mean()).float().mean()))
    return ratios


def read_layer(args: ModelArgs, reader: TensorReader, index: int) -> dict[str, torch.Tensor]:
    return {r.target: shard(r, lambda n: to_fp16(n, reader.get(n)), 0, 1) for r in layer_rules(args, index)}


def embed_samples(reader: TensorReader, samples: list[torch.Tensor]) -> list[torch.Tensor]:
    """The calibration batches [B, L, hidden] fp32 that LayerPass takes, from token sequences [L] each."""
    table = to_fp16("model.embed_tokens.weight", reader.get("model.embed_tokens.weight")).float()
    return [F.embedding(torch.stack([samples[i] for i in group]), table) for group in batches(samples)]


def pruned_input_widths(args: ModelArgs) -> list[int]:
    """Input widths of the seven pruned linears: hidden (q, k, v, gate, up), heads*head_dim (o), MLP (down)."""
    return sorted({args.hidden_size, args.q_size, args.intermediate_size})


def check_options(args: ModelArgs, sparsity: float, nm: tuple[int, int] | None, calib_samples: int,
                  calib_seqlen: int) -> None:
    """Refuse impossible settings before any calibration work, so a typo costs a second, not a run."""
    if not 0.0 <= sparsity < 1.0:  # also refuses NaN
        raise SparsezipError(f"--sparsity must be in [0, 1), got {sparsity}")
    if nm is not None and any(width % nm[1] for width in pruned_input_widths(args)):
        widths = ", ".join(map(str, pruned_input_widths(args)))
        raise SparsezipError(f"--pattern {nm[0]}:{nm[1]} needs input widths divisible by {nm[1]}, "
                             f"but this model's pruned linears have {widths}")
    if calib_samples < 1:
        raise SparsezipError(f"--calib_samples must be at least 1, got {calib_samples}")
    if calib_seqlen < 2:
        raise SparsezipError(f"--calib_seqlen must be at least 2 tokens, got {calib_seqlen}")


def sparsify(model_path: Path, save_path: Path, method: str = "float_sparse", sparsity: float = 0.5,
             pattern: str = "unstructured", calib: list[Path] | None = None, calib_samples: int = 32,
             calib_seqlen: int = 512, device: str = "cpu", part_file_size: float = 5.0,
             overwrite: bool = False, seed: int = 0, rounding: str | None = None, owl: bool = False,
             owl_threshold: float = 5.0, owl_lambda: float = 0.08) -> Path:
    """Prune the 7 linears of every decoder layer of a dense checkpoint and save a W16A16S folder.

    rounding None means the method's own default: L2 precision rounding for float_sparse (as the original
    does), none for the others.
    """
    model_path, save_path = Path(model_path), Path(save_path)
    if detect_kind(model_path) != HF:
        raise SparsezipError(f"{model_path} is already sparse; sparsify takes a dense Hugging Face folder")
    check_output_path(save_path, overwrite, (model_path,))  # fail now, not after calibration
    args = ModelArgs.from_dir(model_path)
    prune = get_method(method)
    nm = parse_pattern(pattern)
    check_options(args, sparsity, nm, calib_samples, calib_seqlen)
    rounding = rounding or ("l2" if method == "float_sparse" else "none")
    if rounding not in ("l2", "none"):
        raise SparsezipError(f"--rounding must be l2 or none, got {rounding!r}")
    if owl and (nm is not None or not prune.calibrated):
        raise SparsezipError("--owl allocates unstructured sparsity from activations: it needs a calibrated "
                             "method (wanda, sparsegpt, float_sparse) and --pattern unstructured")
    settings = PruneSettings(method, prune, nm, rounding)
    reader = TensorReader(safetensors_files(model_path))
    hidden, tokens, n_samples = [], 0, 0
    run = LayerPass(args, device, prune.needs_hessian) if prune.calibrated else None
    if prune.calibrated:
        if not calib:
            raise SparsezipError(f"method {method} needs calibration text: pass --calib FILE")
        samples = calibration_samples(load_tokenizer(model_path), calib, calib_samples, calib_seqlen, seed)
        tokens, n_samples = sum(len(s) for s in samples), len(samples)
        if tokens < 2048:
            log.warning("only %d calibration tokens; at least 2048 are recommended (the inverse can fail)", tokens)
        hidden = embed_samples(reader, samples)
    layer_sparsity = [sparsity] * args.num_layers
    if owl:
        ratios = owl_outlier_ratios(args, reader, hidden, LayerPass(args, device, False), device, owl_threshold)
        layer_sparsity = owl_allocation(ratios, sparsity, owl_lambda)
    with atomic_output_dir(save_path, overwrite, inputs=(model_path,)) as tmp:
        writer = ShardedWriter(tmp, SPARSE_STEM, int(part_file_size * 2**30))
        description, low_rss = {}, None
        for i in tqdm(range(args.num_layers), desc=f"sparsify {method}", unit="layer"):
            fused = read_layer(args, reader, i)
            layer = load_layer(args, fused, i, device)
            passthrough = {}  # norms and biases are saved unchanged
            for rule in layer_rules(args, i):
                if not rule.compressed:
                    passthrough.update(unfuse(rule, fused[rule.target], args))
            del fused  # the fp32 layer holds the weights now; keep peak memory at one copy
            pruned, hidden = prune_layer(args, i, layer, hidden, run, settings, layer_sparsity[i])
            pruned.update(passthrough)
            for name, t in pruned.items():
                writer.add(name, t.cpu())
                description[name] = W16A16S if name.endswith(PRUNABLE_SUFFIXES) else "FLOAT"
            del layer, pruned, passthrough
            low_rss = trim_if_grown(low_rss)
        for rule in global_rules(args):
            writer.add(rule.target, to_fp16(rule.target, reader.get(rule.target)))
            description[rule.target] = "FLOAT"
        writer.close()
        metadata = {
            "method": method, "sparsity": sparsity, "pattern": pattern, "rounding": rounding,
            "calibration_tokens": tokens, "calibration_samples": n_samples,
            "calibration_files": [Path(c).name for c in calib or []],
            "source": model_path.resolve().name, "tool": f"sparsezip {__version__}",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        if owl:
            metadata["owl"] = {"threshold_m": owl_threshold, "lambda": owl_lambda,
                               "layer_sparsity": [round(x, 6) for x in layer_sparsity]}
        write_json(tmp / DESCRIPTION, {"model_quant_type": W16A16S, "version": FORMAT_VERSION,
                                       "metadata": metadata, **description})
        write_fp16_config(model_path, tmp)
        copy_side_files(model_path, tmp)
    return save_path
