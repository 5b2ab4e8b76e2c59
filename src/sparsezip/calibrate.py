"""`sparsify`: prune a dense checkpoint layer by layer with calibration text, into a W16A16S folder.

Sequential calibration: the calibration activations pass through one decoder layer at a time;
each layer's statistics are collected on its dense weights, the layer is pruned, and its *pruned*
output becomes the next layer's input. Only one layer's weights are in memory at once and
finished tensors are written as they are produced.
"""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import __version__
from .checkpoint import (DESCRIPTION, FORMAT_VERSION, HF, SPARSE_STEM, W16A16S, ShardedWriter, TensorReader,
                         atomic_output_dir, check_output_path, copy_side_files, detect_kind, safetensors_files, to_fp16,
                         write_fp16_config)
from .config import ModelArgs, write_json
from .data import calibration_samples
from .errors import SparsezipError
from .masks import parse_pattern
from .model import DecoderLayer, attention_mask, rope_cos_sin
from .pruners import LinearStats, Method, get_method
from .tp import PRUNABLE_SUFFIXES, Dist, global_rules, layer_rules, shard, unfuse

log = logging.getLogger("sparsezip")
FUSED_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


def load_layer(args: ModelArgs, state: dict[str, torch.Tensor], index: int, device: str) -> DecoderLayer:
    """A tp=1 decoder layer in fp32 from its fused fp16 tensors (keys relative to the layer)."""
    with torch.device("meta"):
        layer = DecoderLayer(args, Dist())
    prefix = f"model.layers.{index}."
    local = {k[len(prefix):]: v.to(device=device, dtype=torch.float32) for k, v in state.items()}
    layer.load_state_dict(local, strict=True, assign=True)
    return layer.eval()


class LayerRunner:
    """Runs calibration samples through one layer, grouping equal-length samples into batches."""

    def __init__(self, args: ModelArgs, device: str, batch_size: int = 8):
        self.args, self.device, self.batch_size = args, device, batch_size

    @torch.no_grad()
    def __call__(self, layer: DecoderLayer, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for start in range(0, len(hidden), self.batch_size):
            chunk = hidden[start:start + self.batch_size]
            same_len = all(h.shape[0] == chunk[0].shape[0] for h in chunk)
            batches = [torch.stack(chunk)] if same_len else [h[None] for h in chunk]
            for x in batches:  # x: [B, L, hidden]
                pos = torch.arange(x.shape[1], device=self.device)
                cos, sin = rope_cos_sin(self.args, pos, torch.float32)
                mask = attention_mask(self.args, pos, x.shape[1])
                out += list(layer(x.to(self.device), cos, sin, mask).cpu())
        return out


def collect_stats(layer: DecoderLayer, run: LayerRunner, hidden: list[torch.Tensor]) -> dict[str, LinearStats]:
    """One pass over the calibration set feeds the input statistics of every fused linear."""
    stats, hooks = {}, []
    for name in FUSED_LINEARS:
        linear = layer.get_submodule(name)
        stats[name] = LinearStats(linear.in_features, linear.weight.device)
        hooks.append(linear.register_forward_pre_hook(lambda _m, inp, s=stats[name]: s.add_batch(inp[0])))
    try:
        run(layer, hidden)
    finally:
        for h in hooks:
            h.remove()
    return stats


def prune_layer(args: ModelArgs, index: int, fused: dict[str, torch.Tensor], stats: dict[str, LinearStats] | None,
                method: Method, ratio: float, pattern) -> dict[str, torch.Tensor]:
    """Prune every Hugging Face linear of a layer (q, k, v, o, gate, up, down) separately; returns HF-named fp16."""
    out = {}
    for rule in layer_rules(args, index):
        parts = unfuse(rule, fused[rule.target], args)
        if not rule.compressed:
            out.update(parts)
            continue
        linear = rule.target[len(f"model.layers.{index}."):-len(".weight")]
        for name, w in parts.items():
            pruned = method.prune(w.float(), stats[linear] if stats else None, ratio, pattern)
            out[name] = pruned.to(torch.float16)
    return out


def embed_samples(reader: TensorReader, samples: list[torch.Tensor]) -> list[torch.Tensor]:
    table = to_fp16("model.embed_tokens.weight", reader.get("model.embed_tokens.weight")).float()
    return [F.embedding(s, table) for s in samples]  # each [L, hidden] fp32


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


def sparsify(model_path: Path, save_path: Path, method: str = "wanda", sparsity: float = 0.5,
             pattern: str = "unstructured", calib: list[Path] | None = None, calib_samples: int = 32,
             calib_seqlen: int = 512, device: str = "cpu", part_file_size: float = 5.0,
             overwrite: bool = False, seed: int = 0) -> Path:
    """Prune the 7 linears of every decoder layer of a dense checkpoint and save a W16A16S folder."""
    model_path, save_path = Path(model_path), Path(save_path)
    if detect_kind(model_path) != HF:
        raise SparsezipError(f"{model_path} is already sparse; sparsify takes a dense Hugging Face folder")
    check_output_path(save_path, overwrite, (model_path,))  # fail now, not after calibration
    args = ModelArgs.from_dir(model_path)
    prune = get_method(method)
    nm = parse_pattern(pattern)
    check_options(args, sparsity, nm, calib_samples, calib_seqlen)
    reader = TensorReader(safetensors_files(model_path))
    hidden, tokens = [], 0
    if prune.calibrated:
        if not calib:
            raise SparsezipError(f"method {method} needs calibration text: pass --calib FILE")
        from transformers import AutoTokenizer

        samples = calibration_samples(AutoTokenizer.from_pretrained(model_path), calib, calib_samples,
                                      calib_seqlen, seed)
        tokens = sum(len(s) for s in samples)
        if tokens < 2048:
            log.warning("only %d calibration tokens; at least 2048 are recommended", tokens)
        hidden = embed_samples(reader, samples)
    run = LayerRunner(args, device)
    with atomic_output_dir(save_path, overwrite, inputs=(model_path,)) as tmp:
        writer = ShardedWriter(tmp, SPARSE_STEM, int(part_file_size * 2**30))
        description = {}

        def emit(tensors: dict[str, torch.Tensor], kind: str) -> None:
            for name, t in tensors.items():
                writer.add(name, t)
                description[name] = kind

        for i in tqdm(range(args.num_layers), desc=f"sparsify {method}", unit="layer"):
            fused = {r.target: shard(r, lambda n: to_fp16(n, reader.get(n)), 0, 1) for r in layer_rules(args, i)}
            layer = load_layer(args, fused, i, device) if prune.calibrated else None
            stats = collect_stats(layer, run, hidden) if prune.calibrated else None
            pruned = prune_layer(args, i, fused, stats, prune, sparsity, nm)
            for name, t in pruned.items():
                emit({name: t}, W16A16S if name.endswith(PRUNABLE_SUFFIXES) else "FLOAT")
            if prune.calibrated:  # the next layer calibrates on this layer's pruned output
                pruned_fused = {r.target: shard(r, pruned.__getitem__, 0, 1) for r in layer_rules(args, i)}
                hidden = run(load_layer(args, pruned_fused, i, device), hidden)
        for rule in global_rules(args):
            emit({rule.target: to_fp16(rule.target, reader.get(rule.target))}, "FLOAT")
        writer.close()
        metadata = {
            "method": method, "sparsity": sparsity, "pattern": pattern, "calibration_tokens": tokens,
            "calibration_files": [Path(c).name for c in calib or []], "calibration_samples": len(hidden),
            "source": model_path.resolve().name, "tool": f"sparsezip {__version__}",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        write_json(tmp / DESCRIPTION, {"model_quant_type": W16A16S, "version": FORMAT_VERSION,
                                       "metadata": metadata, **description})
        write_fp16_config(model_path, tmp)
        copy_side_files(model_path, tmp)
    return save_path
