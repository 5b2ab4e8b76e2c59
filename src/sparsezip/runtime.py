"""Load any folder kind into our model, on a device and a tensor-parallel rank, with the pruned linears in the
chosen weight layout (layouts/).

Dense and W16A16S folders are split with the TP table at load time; a W16A16SC part already holds this rank's
fused tensors. Either way every layout receives identical per-rank weights, which is why W16A16S and W16A16SC
outputs agree bit for bit.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from . import layouts
from .checkpoint import TensorReader, release_freed_memory
from .config import ModelArgs
from .errors import SparsezipError
from .formats import (FolderKind, PartReader, check_weights_match_config, detect_kind, linear_prefix, part_dirs,
                      read_description, weight_files)
from .layouts.base import FolderFacts, LayoutContext, LinearSource, WeightLayout
from .layouts.dense import DenseLinear, held_dtype, hold
from .model import Transformer
from .tp import EMBEDDING, Dist, SplitRule, all_reduce, all_rules, check_tp_size, shard

log = logging.getLogger("sparsezip")


def pick_device(device: str | None) -> str:
    """`None` or "auto" means CUDA when present; asking for CUDA without one is a clear error."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SparsezipError("--device cuda was requested but no CUDA GPU is available; use --device cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise SparsezipError(f"unknown device {device!r}; use cpu or cuda")
    return device


def default_dtype(device: str) -> torch.dtype:
    # fp16 matmuls are slow and less accurate on CPUs, so compute in fp32 there
    return torch.float16 if device.startswith("cuda") else torch.float32


@dataclass
class RankWeights:
    """This rank's tensors: the pruned linears (by prefix) apart, everything else by model parameter name.

    A pruned linear is read only when its layout is built (`take`), so loading holds the built layouts plus one
    matrix, not every fp16 matrix at once: a 7B W16A16S folder is 15 GB of them.
    """

    linears: dict[str, Callable[[], LinearSource]] = field(default_factory=dict)
    state: dict[str, torch.Tensor] = field(default_factory=dict)

    def take(self, prefix: str) -> LinearSource:
        """Read one pruned linear and forget it."""
        return self.linears.pop(prefix)()


def rank_weights_from_dense(model_dir: Path, kind: FolderKind, args: ModelArgs, dist: Dist,
                            mapped: frozenset[str] = frozenset()) -> RankWeights:
    """This rank's fused tensors from a dense or W16A16S folder, via the TP table; the `mapped` ones memory-mapped
    where this rank takes them whole (TP 1)."""
    check_tp_size(args, dist.size)
    if kind == FolderKind.W16A16S:
        read_description(model_dir, kind)  # refuses a description that disagrees with the weights
    reader = TensorReader(weight_files(model_dir))
    check_weights_match_config(reader, args, model_dir)

    def read(name: str) -> torch.Tensor:
        return reader.mapped(name) if name in mapped and dist.size == 1 else reader.get(name)

    def linear(rule: SplitRule) -> LinearSource:
        return LinearSource(linear_prefix(rule.target), model_dir, dense=shard(rule, read, dist.rank, dist.size))

    rules = list(all_rules(args))
    return RankWeights({linear_prefix(r.target): partial(linear, r) for r in rules if r.compressed},
                       {r.target: shard(r, read, dist.rank, dist.size) for r in rules if not r.compressed})


def rank_part(model_dir: Path, dist: Dist) -> Path:
    """This rank's part folder of a W16A16SC model, which must have been compressed for this many processes."""
    parts = part_dirs(model_dir)
    if len(parts) != dist.size:
        raise SparsezipError(
            f"{model_dir} was compressed for TP={len(parts)} but this run has {dist.size} process(es); "
            f"launch with: torchrun --nproc_per_node {len(parts)} -m sparsezip ..."
        )
    return parts[dist.rank]


def rank_weights_from_part(model_dir: Path, dist: Dist, mapped: frozenset[str] = frozenset()) -> RankWeights:
    """This rank's part of a W16A16SC folder: FLOAT tensors as stored (the `mapped` ones memory-mapped), linears
    as their codec streams."""
    part = PartReader(rank_part(model_dir, dist))

    def linear(prefix: str) -> LinearSource:
        return LinearSource(prefix, part.file, stored=part.read_linear(prefix))

    return RankWeights({prefix: partial(linear, prefix) for prefix in part.linear_prefixes()},
                       {name: part.reader.mapped(name) if name in mapped else part.read_float(name)
                        for name in part.float_names()})


def separate_linears(weights: RankWeights, args: ModelArgs, where: Path) -> None:
    """Move the pruned linears (the codec-stored ones of the TP table) that arrived as plain tensors from
    `state` to `linears`, and make sure every one of them is there."""
    for rule in all_rules(args):
        if rule.compressed and rule.target in weights.state:
            prefix = linear_prefix(rule.target)
            weights.linears[prefix] = partial(LinearSource, prefix, where, dense=weights.state.pop(rule.target))
    pruned = {linear_prefix(rule.target) for rule in all_rules(args) if rule.compressed}
    missing = sorted(pruned - set(weights.linears))
    if missing:
        raise SparsezipError(f"{where} lacks tensor {missing[0]}.weight")


def serving_class(name: str, kind: FolderKind, device: str, dtype: torch.dtype) -> type[WeightLayout] | None:
    """The class of layout `name` that serves this folder kind, device and compute dtype, if any."""
    candidates = layouts.classes(name)
    if kind not in candidates[0].folder_kinds:
        return None
    return next((cls for cls in candidates if cls.supports(device, dtype)), None)


def folder_facts(model_dir: Path, kind: FolderKind, dist: Dist) -> FolderFacts:
    """Sparsity, rounding and stored bits of a folder's pruned linears, from descriptions and file headers only."""
    if kind == FolderKind.DENSE:
        return FolderFacts(kind)
    if kind == FolderKind.W16A16S:
        made = read_description(model_dir, kind).metadata
        return FolderFacts(kind, float(made.get("sparsity", 0.0)), made.get("rounding") == "l2")
    part = PartReader(rank_part(model_dir, dist))
    made = part.description.metadata.get("sparsify", {})
    stored = sum(part.linear_bytes(prefix) for prefix in part.linear_prefixes())
    weights = sum(part.linear_numel(prefix) for prefix in part.linear_prefixes())
    return FolderFacts(kind, float(made.get("sparsity", 0.0)), made.get("rounding") == "l2",
                       8 * stored / max(weights, 1))


def free_memory(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    import psutil

    return psutil.virtual_memory().available


# fp16 bytes of pruned linears that `auto` times in each layout on the CPU: more than the last-level cache, so that
# (the layouts' passes interleaved) each pass streams its weights from memory, as a decode step does.
PROBE_BYTES = 64 * 2**20
PROBE_PASSES = 5  # the best of these per layout: a shared machine's noise only ever adds time


def probe_sources(weights: RankWeights) -> list[LinearSource]:
    """The first pruned linears of this rank, in model order, until they hold PROBE_BYTES of fp16 weights (read
    again, not taken: the model is built from `weights` afterwards)."""
    sources, total = [], 0
    for read in weights.linears.values():
        sources.append(read())
        total += 2 * sources[-1].shape[0] * sources[-1].shape[1]
        if total >= PROBE_BYTES:
            break
    return sources


def time_layouts(classes: dict[str, type[WeightLayout]], sources: list[LinearSource], ctx: LayoutContext,
                 dist: Dist) -> dict[str, float]:
    """Seconds one decode step (batch 1) takes through `sources` in each layout, on this machine: the best of
    PROBE_PASSES passes, the layouts' passes interleaved so that none runs on weights another left in cache. Under
    tensor parallelism the ranks' times are summed, so that every rank takes the same layout."""
    built = {name: [build_layer(source, None, cls, ctx) for source in sources] for name, cls in classes.items()}
    inputs = [torch.randn(1, source.shape[1], dtype=ctx.dtype, device=ctx.device) for source in sources]
    best = dict.fromkeys(built, float("inf"))
    with torch.inference_mode():
        for step in range(PROBE_PASSES + 1):  # step 0 warms up (page faults, the thread pool, lazy buffers)
            for name, layers in built.items():
                start = time.perf_counter()
                for layer, x in zip(layers, inputs):
                    layer(x)
                if step:
                    best[name] = min(best[name], time.perf_counter() - start)
    seconds = all_reduce(torch.tensor(list(best.values()), dtype=torch.float64), dist)
    return dict(zip(best, seconds.tolist()))


def auto_layout(model_dir: Path, kind: FolderKind, args: ModelArgs, device: str, dtype: torch.dtype,
                dist: Dist, weights: RankWeights) -> str:
    """The fastest layout that serves this folder on this device and fits in its free memory, said in a log line.
    On the CPU "fastest" is measured on this machine (time_layouts): which layout wins depends on its memory
    bandwidth against its core's speed at expanding sparse groups, and differs between machines we know. On CUDA
    it is the registry's order."""
    facts = folder_facts(model_dir, kind, dist)
    pruned, other = weight_counts(args, dist.size)
    free = free_memory(device)
    serving = {name: cls for name in layouts.auto_order(torch.device(device).type)
               if (cls := serving_class(name, kind, device, dtype)) is not None}
    need = {name: int(pruned * cls.estimated_bits(facts) / 8 + 2 * other) for name, cls in serving.items()}
    measured = device == "cpu" and len(serving) > 1
    seconds = time_layouts(serving, probe_sources(weights), LayoutContext(device, dtype), dist) if measured else {}
    fitting = [name for name in serving if need[name] <= 0.9 * free]  # registry order: ties keep it
    name = min(fitting, key=lambda n: seconds.get(n, 0.0)) if fitting else min(need, key=need.get)
    if not fitting:
        why = "the smallest: none fits"
    elif measured:
        timed = ", ".join(f"{n} {1e3 * t:.1f} ms" for n, t in sorted(seconds.items(), key=lambda item: item[1]))
        why = f"the fastest that fits, measured on this machine per step through the first {PROBE_BYTES >> 20} MB " \
              f"of linears: {timed}"
    else:
        why = "the first that fits in the registry's order"
    log.info("weights: %s (%s; a %s folder on %s, about %.2f GB of weights, %.1f GB free; --weights chooses "
             "another)", name, why, kind, device, need[name] / 1e9, free / 1e9)
    return name


def weight_counts(args: ModelArgs, tp: int) -> tuple[int, int]:
    """(weights of one rank's pruned linears, of its other matrices: embedding and lm_head)."""
    per_layer = (args.q_size + 2 * args.kv_size) * args.hidden_size + args.q_size * args.hidden_size + \
        3 * args.intermediate_size * args.hidden_size
    tables = args.vocab_size * args.hidden_size * (1 if args.tie_word_embeddings else 2)
    return args.num_layers * per_layer // tp, tables // tp


def choose_layout(name: str, kind: FolderKind, device: str, dtype: torch.dtype) -> type[WeightLayout]:
    """The class of layout `name` that serves this folder kind, device and compute dtype, or a clear error."""
    candidates = layouts.classes(name)
    if kind not in candidates[0].folder_kinds:
        kinds = " or ".join(candidates[0].folder_kinds)
        first = {FolderKind.DENSE: "sparsify it first (`sparsezip sparsify`) or ",
                 FolderKind.W16A16S: "compress it first (`sparsezip compress`) or "}.get(kind, "")
        raise SparsezipError(f"--weights {name} needs a {kinds} folder, but this is a {kind} folder; {first}"
                             "use --weights dense")
    for cls in candidates:
        if cls.supports(device, dtype):
            return cls
    raise SparsezipError(f"--weights {name} does not run on {device} with {dtype} activations; use --weights dense")


def swap_linear(model: Transformer, prefix: str, layer: WeightLayout) -> None:
    """Replace the linear at `prefix` by `layer`, after checking its [out, in] shape against the model's."""
    parent_name, _, child = prefix.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child, None)
    if old is None:
        raise SparsezipError(f"{prefix} is not a linear of this model")
    shape = (layer.out_features, layer.in_features)
    if (old.out_features, old.in_features) != shape:
        raise SparsezipError(f"{prefix} has shape {shape} in the folder, config.json implies "
                             f"({old.out_features}, {old.in_features})")
    setattr(parent, child, layer)


def build_linears(model: Transformer, weights: RankWeights, layout: type[WeightLayout], ctx: LayoutContext) -> None:
    """Every pruned linear of this rank in `layout` (dense where the folder holds no stream for a stream layout);
    its bias (a FLOAT tensor) goes with it."""
    for prefix in tqdm(list(weights.linears), desc=f"building {layout.__name__}", unit="linear", leave=False,
                       disable=None):  # on a terminal only: a bar cut short by an error would garble its line
        source = weights.take(prefix)
        swap_linear(model, prefix, build_layer(source, weights.state.pop(prefix + ".bias", None), layout, ctx))
        del source  # keeps peak memory near one decoded matrix plus the built layouts


def build_layer(source: LinearSource, bias: torch.Tensor | None, layout: type[WeightLayout],
                ctx: LayoutContext) -> WeightLayout:
    """One pruned linear in `layout` (dense where the folder holds no stream for a stream layout), its bias (a FLOAT
    tensor) in the compute dtype."""
    if bias is not None:
        bias = bias.to(ctx.device, ctx.dtype)
    chosen = DenseLinear if layout.needs_stream and source.stored is None else layout
    return chosen.build(source, bias, ctx)


def hold_float_tensors(rank: RankWeights, mapped: frozenset[str], dtype: torch.dtype, device: str) -> None:
    """Each tensor of `rank.state` in its held form, in place, before any layout is built: held at the end, a tied
    table (445 MiB in Qwen2.5-1.5B) was in memory twice on top of every built layout. A mapped tensor whose dtype
    is already the held one stays mapped."""
    for name, tensor in rank.state.items():
        if not (name in mapped and tensor.dtype == held_dtype(tensor, dtype, device)):
            rank.state[name] = hold(tensor, dtype, device)


def load_model(model_dir: Path, device: str = "cpu", dtype: torch.dtype | None = None,
               dist: Dist = Dist(), weights: str = "dense") -> Transformer:
    """Build our model for this rank from a dense, W16A16S or W16A16SC folder, its pruned linears held in the
    weight layout named `weights` (see layouts.LAYOUTS; "auto" picks one)."""
    model_dir = Path(model_dir)
    kind = detect_kind(model_dir)
    args = ModelArgs.from_dir(model_dir)
    dtype = dtype or default_dtype(device)
    # a named layout that cannot serve fails before any reading; `auto` chooses once the weights are open
    layout = None if weights == layouts.AUTO else choose_layout(weights, kind, device, dtype)
    # a decode step reads one embedding row per token: mapped, the rest of the table never takes memory (an
    # untied table is 15% of Qwen2.5-1.5B); it stays mapped where its held dtype is the stored one (fp16 on CPU).
    # A tied table is read whole by every step's lm_head: held like any other matrix.
    mapped = frozenset({EMBEDDING}) if device == "cpu" and not args.tie_word_embeddings else frozenset()
    if kind == FolderKind.W16A16SC:
        rank = rank_weights_from_part(model_dir, dist, mapped)
    else:
        rank = rank_weights_from_dense(model_dir, kind, args, dist, mapped)
    separate_linears(rank, args, model_dir)
    check_the_rest(rank, args, dist, model_dir)  # before auto's timings, whose choice is printed
    hold_float_tensors(rank, mapped, dtype, device)
    if layout is None:
        weights = auto_layout(model_dir, kind, args, device, dtype, dist, rank)
        layout = choose_layout(weights, kind, device, dtype)
    with torch.device("meta"):
        model = Transformer(args, dist)
    build_linears(model, rank, layout, LayoutContext(device, dtype))
    expected = {k: v.shape for k, v in model.state_dict().items() if v.is_meta}
    model.load_state_dict({name: rank.state.pop(name) for name in expected}, strict=False, assign=True)
    del rank
    release_freed_memory()
    log.info("loaded %s folder %s (rank %d of %d) on %s as %s, %s layout", kind, model_dir, dist.rank, dist.size,
             device, dtype, weights)
    return model.eval()


def check_the_rest(rank: RankWeights, args: ModelArgs, dist: Dist, where: Path) -> None:
    """Every tensor of this rank's model besides the pruned linears is held, with the shape config.json implies."""
    with torch.device("meta"):
        needed = Transformer(args, dist).state_dict()
    for name, tensor in needed.items():
        if name.rpartition(".")[0] in rank.linears:
            continue
        if name not in rank.state:
            raise SparsezipError(f"{where} lacks tensor {name}")
        if rank.state[name].shape != tensor.shape:
            raise SparsezipError(f"{name} has shape {tuple(rank.state[name].shape)} in {where}, "
                                 f"config.json implies {tuple(tensor.shape)}")


def weight_bytes(model: nn.Module) -> int:
    """Resident bytes of the model's weights: every layout's own bytes, every other parameter, and each shared
    scratch buffer once."""
    layers = [m for m in model.modules() if isinstance(m, WeightLayout)]
    inside = {id(p) for m in layers for p in m.parameters()}
    total = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in inside)
    total += sum(m.resident_bytes() for m in layers)
    scratches = {id(s): s for s in (m.uses_scratch() for m in layers) if s is not None}
    return total + sum(s.nbytes for s in scratches.values())
