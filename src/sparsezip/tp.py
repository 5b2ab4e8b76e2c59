"""Tensor-parallel split rules: the single table used by both `compress` and the loader.

Every per-rank tensor is built from Hugging Face tensors by one rule: take the listed sources,
cut each into `tp` equal chunks along `dim`, keep this rank's chunk of each and concatenate
them along `dim`. Because q, k and v are chunked separately before fusing, the fused qkv
rows of a rank are whole heads (GQA-aware); the same holds for gate and up.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from .config import ModelArgs
from .errors import SparsezipError

COLUMN, ROW, REPLICATE = 0, 1, None  # split dim of a [out, in] weight


@dataclass(frozen=True)
class SplitRule:
    target: str  # per-rank tensor name (suffix after "model.layers.{i}." for layer rules)
    sources: tuple[str, ...]  # Hugging Face names, concatenated in this order after chunking
    dim: int | None  # COLUMN splits output rows, ROW splits input columns, REPLICATE copies
    compressed: bool  # a pruned linear weight, stored with the codec in W16A16SC
    needs: str | None = None  # ModelArgs flag that must be true for the tensor to exist


LAYER_RULES = (
    SplitRule(
        "self_attn.qkv_proj.weight",
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        COLUMN,
        True,
    ),
    SplitRule(
        "self_attn.qkv_proj.bias",
        ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
        COLUMN,
        False,
        needs="qkv_bias",
    ),
    SplitRule("self_attn.o_proj.weight", ("self_attn.o_proj.weight",), ROW, True),
    SplitRule("self_attn.q_norm.weight", ("self_attn.q_norm.weight",), REPLICATE, False, "qk_norm"),
    SplitRule("self_attn.k_norm.weight", ("self_attn.k_norm.weight",), REPLICATE, False, "qk_norm"),
    SplitRule("mlp.gate_up_proj.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), COLUMN, True),
    SplitRule("mlp.down_proj.weight", ("mlp.down_proj.weight",), ROW, True),
    SplitRule("input_layernorm.weight", ("input_layernorm.weight",), REPLICATE, False),
    SplitRule("post_attention_layernorm.weight", ("post_attention_layernorm.weight",), REPLICATE, False),
)

EMBEDDING = "model.embed_tokens.weight"
GLOBAL_RULES = (
    SplitRule(EMBEDDING, (EMBEDDING,), COLUMN, False),  # vocab rows
    SplitRule("model.norm.weight", ("model.norm.weight",), REPLICATE, False),
    SplitRule("lm_head.weight", ("lm_head.weight",), COLUMN, False),  # vocab rows
)

# The seven linears that sparsify prunes, as Hugging Face name suffixes inside a layer.
PRUNABLE_SUFFIXES = tuple(s for r in LAYER_RULES if r.compressed for s in r.sources)


def layer_rules(args: ModelArgs, layer: int) -> list[SplitRule]:
    """The rules of one decoder layer with full names, keeping only tensors this family has."""
    prefix = f"model.layers.{layer}."
    return [
        SplitRule(prefix + r.target, tuple(prefix + s for s in r.sources), r.dim, r.compressed)
        for r in LAYER_RULES
        if r.needs is None or getattr(args, r.needs)
    ]


def global_rules(args: ModelArgs) -> list[SplitRule]:
    return [r for r in GLOBAL_RULES if not (r.target == "lm_head.weight" and args.tie_word_embeddings)]


def all_rules(args: ModelArgs) -> Iterator[SplitRule]:
    """Every per-rank tensor of the model, global ones first, then layer by layer."""
    yield from global_rules(args)
    for i in range(args.num_layers):
        yield from layer_rules(args, i)


def source_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """The shape config.json implies for every Hugging Face tensor the rules read, by full name."""
    h, q, kv, mlp, vocab = args.hidden_size, args.q_size, args.kv_size, args.intermediate_size, args.vocab_size
    by_suffix = {"q_proj.weight": (q, h), "k_proj.weight": (kv, h), "v_proj.weight": (kv, h),
                 "q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,), "o_proj.weight": (h, q),
                 "q_norm.weight": (args.head_dim,), "k_norm.weight": (args.head_dim,),
                 "gate_proj.weight": (mlp, h), "up_proj.weight": (mlp, h), "down_proj.weight": (h, mlp),
                 "layernorm.weight": (h,), "embed_tokens.weight": (vocab, h), "model.norm.weight": (h,),
                 "lm_head.weight": (vocab, h)}
    shapes = {}
    for rule in all_rules(args):
        for name in rule.sources:
            shapes[name] = next(shape for suffix, shape in by_suffix.items() if name.endswith(suffix))
    return shapes


def valid_tp_sizes(args: ModelArgs, limit: int = 64) -> list[int]:
    """TP sizes that split heads, KV heads, the MLP width and the vocabulary evenly."""
    sizes = (args.num_heads, args.num_kv_heads, args.intermediate_size, args.vocab_size)
    return [tp for tp in range(1, limit + 1) if all(s % tp == 0 for s in sizes)]


def check_tp_size(args: ModelArgs, tp: int) -> None:
    if tp < 1 or tp not in valid_tp_sizes(args, max(tp, 1)):
        raise SparsezipError(
            f"TP size {tp} does not divide this model's heads ({args.num_heads}), KV heads ({args.num_kv_heads}), "
            f"MLP width ({args.intermediate_size}) and vocabulary ({args.vocab_size}); "
            f"valid sizes: {', '.join(map(str, valid_tp_sizes(args)))}"
        )


def rank_share(size: int, rank: int, tp: int) -> slice:
    """The indices a rank holds of a split dimension of `size` entries. check_tp_size makes tp divide every split
    dimension, so each rank holds an equal, contiguous share."""
    width = size // tp
    return slice(rank * width, (rank + 1) * width)


def shard(rule: SplitRule, read: Callable[[str], torch.Tensor], rank: int, tp: int) -> torch.Tensor:
    """This rank's tensor for one rule; `read(name)` returns a full Hugging Face tensor."""
    pieces = [read(name) for name in rule.sources]
    if rule.dim is None:
        return pieces[0]
    if len(pieces) == 1 and tp == 1:  # no copy: a memory-mapped table stays mapped
        return pieces[0]
    shares = [rank_share(p.shape[rule.dim], rank, tp) for p in pieces]
    return torch.cat([p.narrow(rule.dim, s.start, s.stop - s.start) for p, s in zip(pieces, shares)],
                     dim=rule.dim).contiguous()


def unshard(rule: SplitRule, pieces: list[torch.Tensor],
            shapes: dict[str, tuple[int, ...]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The full Hugging Face tensors of a rule from every rank's piece, in rank order (the inverse of `shard`)."""
    if rule.dim is None:
        yield rule.sources[0], pieces[0]
        return
    shares = [rank_share(shapes[name][rule.dim], 0, len(pieces)) for name in rule.sources]
    widths = [share.stop - share.start for share in shares]
    for rank, piece in enumerate(pieces):
        if piece.dim() <= rule.dim or piece.shape[rule.dim] != sum(widths):
            raise SparsezipError(f"part {rank}: {rule.target} has shape {list(piece.shape)}; config.json implies "
                                 f"{sum(widths)} along dimension {rule.dim} for {len(pieces)} parts")
    by_rank = [piece.split(widths, dim=rule.dim) for piece in pieces]
    for i, name in enumerate(rule.sources):
        yield name, torch.cat([chunks[i] for chunks in by_rank], dim=rule.dim)


def source_rows(rule: SplitRule, args: ModelArgs) -> list[tuple[str, slice]]:
    """Where each Hugging Face source sits inside an unsharded (tp=1) fused tensor: (name, slice of `rule.dim`)."""
    if len(rule.sources) == 1:
        return [(rule.sources[0], slice(None))]
    sizes = [args.q_size, args.kv_size, args.kv_size] if "qkv" in rule.target else [args.intermediate_size] * 2
    ends = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    return [(name, slice(end - size, end)) for name, size, end in zip(rule.sources, sizes, ends)]


@dataclass(frozen=True)
class Dist:
    """Where this process sits in a tensor-parallel group (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Dist:
        """This process's place as torchrun's WORLD_SIZE, RANK and LOCAL_RANK say: the only reader of them."""
        try:
            size, rank, local = (int(os.environ.get(k, d)) for k, d in
                                 (("WORLD_SIZE", "1"), ("RANK", "0"), ("LOCAL_RANK", "0")))
        except ValueError:
            raise SparsezipError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun)") from None
        return cls(rank, size, local)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """The device this rank computes on: its own GPU under torchrun on CUDA."""
        return f"cuda:{self.local_rank}" if device.startswith("cuda") and self.size > 1 else device


@contextmanager
def process_group(device: str) -> Iterator[Dist]:
    """Join torchrun's process group for the block (gloo on CPU, nccl on CUDA) and leave it on every exit path,
    so that its threads are stopped while the interpreter is whole (and an in-process caller may join again). The
    process itself then leaves through cli.run_as_process."""
    dist_info = Dist.from_env()
    if dist_info.size == 1:
        yield dist_info
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(dist_info.local_rank)
        dist.init_process_group(backend)
    try:
        yield Dist(dist.get_rank(), dist.get_world_size(), dist_info.local_rank)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def all_reduce(x: torch.Tensor, dist_info: Dist) -> torch.Tensor:
    if dist_info.size > 1:
        import torch.distributed as dist

        dist.all_reduce(x)
    return x


def all_gather_last(x: torch.Tensor, dist_info: Dist) -> torch.Tensor:
    """Concatenate every rank's slice of the last dimension, in rank order."""
    if dist_info.size == 1:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(dist_info.size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)


def broadcast_object(obj: object, dist_info: Dist) -> object:
    """Rank 0's `obj` on every rank: rank 0 reads the user's input or a request, the other ranks follow it."""
    if dist_info.size == 1:
        return obj
    import torch.distributed as dist

    box = [obj if dist_info.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
