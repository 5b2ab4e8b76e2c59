"""Load any folder kind into our model, on a device and a tensor-parallel rank.

Dense and W16A16S folders are split with the TP table at load time; a W16A16SC part already
holds this rank's fused tensors and only needs its linears decoded. Either way the model
receives identical per-rank tensors, which is why W16A16S and W16A16SC outputs agree bit for bit.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from . import WEIGHT_MODES, codec
from .kernels import cpu as cpu_codec
from .kernels.cpu_linear import SparseWeight, mixed_linear, pack_sparse, sparse_linear
from .checkpoint import (COMPRESSED_FILE, W16A16S, W16A16SC, TensorReader, detect_kind, part_dirs,
                         read_description, release_freed_memory, safetensors_files)
from .config import ModelArgs
from .errors import SparsezipError
from .model import Transformer
from .tp import Dist, all_rules, check_tp_size, layer_rules, shard

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


def rank_state_from_dense(model_dir: Path, args: ModelArgs, dist: Dist) -> dict[str, torch.Tensor]:
    """This rank's fused tensors from a dense or W16A16S folder, via the TP table."""
    check_tp_size(args, dist.size)
    if detect_kind(model_dir) == W16A16S:
        read_description(model_dir, W16A16S)  # refuses a description that disagrees with the weights
    reader = TensorReader(safetensors_files(model_dir))
    return {rule.target: shard(rule, reader.get, dist.rank, dist.size) for rule in all_rules(args)}


def read_part(part_dir: Path, keep_compressed: bool = False) -> dict[str, torch.Tensor | codec.EncodedWeight]:
    """Read one W16A16SC part (read_description checks it against the file): FLOAT tensors as they are,
    compressed linears decoded to fused fp16 tensors, or kept as stored with `keep_compressed`
    (after one full checked decode, so a damaged file fails at load, not in the middle of a reply)."""
    desc = read_description(part_dir, W16A16SC)
    reader = TensorReader([part_dir / COMPRESSED_FILE])
    where = part_dir / COMPRESSED_FILE
    state: dict[str, torch.Tensor | codec.EncodedWeight] = {}
    for name, kind in codec_entries(desc):
        if kind == "FLOAT":
            state[name] = reader.get(name)
            continue
        stored = read_stored(reader, name)
        decoded = decode_linear(stored, name, where)
        state[name] = stored if keep_compressed else decoded
    return state


def read_stored(reader: TensorReader, name: str) -> codec.EncodedWeight:
    """The three stored tensors of the compressed linear `<p>.weight`: `<p>.weight`, `<p>.index`, `<p>.info`."""
    prefix = name[: -len(".weight")]
    return codec.EncodedWeight(reader.get(name), reader.get(prefix + ".index"), reader.get(prefix + ".info"))


def decode_linear(stored: codec.EncodedWeight, name: str, where: Path) -> torch.Tensor:
    """Decode one compressed linear, naming file and tensor in any codec error (a CRC mismatch, say),
    so the user learns which part is damaged."""
    try:
        return codec.decode(stored.weight, stored.index, stored.info)
    except SparsezipError as e:
        raise SparsezipError(f"{where}: {name}: {e}") from None


def codec_entries(desc: dict) -> list[tuple[str, str]]:
    """(tensor name, FLOAT|W16A16SC) for every tensor a part loads; .index/.info travel with .weight."""
    entries = []
    for name, kind in desc.items():
        if name in ("model_quant_type", "version", "metadata") or name.endswith((".outdim", ".index", ".info")):
            continue
        if kind not in ("FLOAT", W16A16SC):
            raise SparsezipError(f"unknown tensor type {kind!r} for {name} in the description")
        entries.append((name, kind))
    return entries


def rank_state(model_dir: Path, args: ModelArgs, dist: Dist,
               keep_compressed: bool = False) -> dict[str, torch.Tensor | codec.EncodedWeight]:
    kind = detect_kind(model_dir)
    if kind != W16A16SC:
        if keep_compressed:
            raise SparsezipError(f"--weights compressed needs a W16A16SC folder, but {model_dir} is a {kind} folder; "
                                 "compress it first (`sparsezip compress`) or use --weights dense")
        return rank_state_from_dense(model_dir, args, dist)
    parts = part_dirs(model_dir)
    if len(parts) != dist.size:
        raise SparsezipError(
            f"{model_dir} was compressed for TP={len(parts)} but this run has {dist.size} process(es); "
            f"launch with: torchrun --nproc_per_node {len(parts)} -m sparsezip ..."
        )
    return read_part(parts[dist.rank], keep_compressed)


class Scratch:
    """One reusable buffer that every compressed linear of a model decodes its weight into, so resident
    weight memory is the compressed bytes plus the largest single decoded matrix."""

    def __init__(self, numel: int, device: str):
        # fp16 like the stored weights: mixed_linear computes in the activations' dtype
        self.buffer = torch.empty(numel, dtype=torch.float16, device=device)

    def decode(self, stored: codec.EncodedWeight, shape: tuple[int, int]) -> torch.Tensor:
        out = self.buffer[: shape[0] * shape[1]].view(shape)
        if out.device.type == "cpu":  # the stream was CRC-checked once at load; skip that here
            return cpu_codec.decode_into(stored.weight, stored.index, stored.info, out, check_crc=False)
        return out.copy_(codec.decode(stored.weight, stored.index, stored.info))


class CompressedLinear(nn.Module):
    """A linear layer whose weight stays compressed in memory and is decoded on the data path of every
    forward, into the model's shared scratch buffer. Same numbers as nn.Linear on the decoded weight."""

    def __init__(self, stored: codec.EncodedWeight, bias: nn.Parameter | None, scratch: Scratch):
        super().__init__()
        self.in_features, self.out_features = int(stored.info[2]), int(stored.info[3])
        self.stored = stored  # plain tensors, not buffers: they are not part of the state dict
        self.bias = bias  # loaded with the state dict like any other parameter
        self.scratch = scratch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features and x.dtype == torch.float32 and x.device.type == "cpu":
            # one row (a batch-1 decode step): multiply straight from the tiles, no scratch write at all
            stored = self.stored
            y = cpu_codec.linear(x.reshape(1, -1), stored.weight, stored.index, stored.info, self.bias, check_crc=False)
            return y.view(*x.shape[:-1], self.out_features)
        return mixed_linear(x, self.scratch.decode(self.stored, (self.out_features, self.in_features)), self.bias)

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.stored.weight, self.stored.index, self.stored.info))


class SparseLinear(nn.Module):
    """A CPU linear whose pruned fp16 weight is held as a bitmap plus its nonzero values (one byte each for
    E5M2-valued weights; see kernels.cpu_linear.SparseWeight) and expanded in registers inside the product.
    Inputs of many rows unpack the weight into the model's shared scratch buffer first. Same numbers as the
    dense fp16 weight gives."""

    def __init__(self, sparse: SparseWeight, bias: nn.Parameter | None, scratch: Scratch):
        super().__init__()
        self.out_features, self.in_features = sparse.shape
        self.sparse = sparse  # numpy arrays, not part of the state dict
        self.bias = bias
        self.scratch = scratch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_linear(x, self.sparse, self.bias, self.scratch.buffer)

    def stored_bytes(self) -> int:
        return self.sparse.nbytes


class FusedCompressedLinear(nn.Module):
    """The CUDA form of a compressed linear: its tiles live on the GPU and a Triton kernel decompresses them
    in registers inside the matmul (batches up to 16; larger ones decode then call cuBLAS)."""

    def __init__(self, kernels, device_weight, bias: nn.Parameter | None):
        super().__init__()
        self.kernels = kernels  # the kernels.triton_codec module (tests pass an interpreter build of it)
        self.device_weight = device_weight  # built by kernels.prepare()
        self.in_features, self.out_features = device_weight.k, device_weight.n
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernels.linear(x, self.device_weight)
        return y + self.bias if self.bias is not None else y

    def stored_bytes(self) -> int:
        return self.device_weight.nbytes


def fused_kernels(device: str):
    """The Triton kernel module when it can serve `device` (a CUDA GPU with triton installed), else None:
    then the torch reference decode into a scratch buffer serves instead."""
    if not device.startswith("cuda"):
        return None
    try:
        from .kernels import triton_codec
    except ImportError:
        return None
    return triton_codec if triton_codec.available(device) else None


def swap_linear(model: Transformer, prefix: str, shape: tuple[int, int], make) -> None:
    """Replace the nn.Linear at `prefix` by make(old linear), after checking the new weight's [out, in] shape."""
    parent_name, _, child = prefix.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    if (old.out_features, old.in_features) != shape:
        raise SparsezipError(f"{prefix} has shape {shape} in the part, config.json implies "
                             f"({old.out_features}, {old.in_features})")
    setattr(parent, child, make(old))


def keep_linears_compressed(model: Transformer, state: dict, device: str) -> None:
    """Swap every nn.Linear whose weight is in `state` as a stored codec stream for a compressed linear
    (fused Triton kernel on CUDA, else a shared scratch buffer); removes those entries from `state`."""
    compressed = {name[: -len(".weight")]: state.pop(name) for name in list(state)
                  if isinstance(state[name], codec.EncodedWeight)}
    largest = max((int(s.info[2]) * int(s.info[3]) for s in compressed.values()), default=0)
    kernels = fused_kernels(device)
    scratch = Scratch(largest if kernels is None else 0, device)
    for prefix, stored in compressed.items():
        shape = (int(stored.info[3]), int(stored.info[2]))
        if kernels is not None:  # the stream was checked by the full decode at load: no second verification
            fused = kernels.prepare(stored.weight, stored.index, stored.info, device, verify=False)
            swap_linear(model, prefix, shape, lambda old: FusedCompressedLinear(kernels, fused, old.bias))
        else:
            swap_linear(model, prefix, shape, lambda old: CompressedLinear(stored, old.bias, scratch))


def hold_linears_sparse(model: Transformer, state: dict, args: ModelArgs) -> None:
    """Swap every pruned linear (the codec-stored ones of the TP table) for a SparseLinear built from its fp16
    weight in `state`; removes those entries from `state`."""
    names = [r.target for i in range(args.num_layers) for r in layer_rules(args, i) if r.compressed]
    largest = max(state[name].numel() for name in names)
    scratch = Scratch(largest, "cpu")
    for name in tqdm(names, desc="packing sparse weights", unit="linear", leave=False):
        weight = state.pop(name)
        sparse = pack_sparse(weight)
        del weight  # keeps peak memory near one dense copy plus the packed ones
        swap_linear(model, name[: -len(".weight")], sparse.shape, lambda old: SparseLinear(sparse, old.bias, scratch))


def weight_bytes(model: nn.Module) -> int:
    """Resident bytes of the model's weights: parameters, plus compressed streams and their scratch buffer."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    scratches = set()
    for m in model.modules():
        if isinstance(m, (CompressedLinear, FusedCompressedLinear, SparseLinear)):
            total += m.stored_bytes()
        if isinstance(m, (CompressedLinear, SparseLinear)):
            scratches.add(m.scratch)
    return total + sum(s.buffer.numel() * s.buffer.element_size() for s in scratches)


def held_dtype(name: str, tensor: torch.Tensor, compute: torch.dtype, device: str) -> torch.dtype:
    """The dtype a tensor is held in: fp16 matrices stay fp16 under fp32 CPU compute (Linear and the embedding
    convert on the fly, and a decode step reads half the bytes); everything else takes the compute dtype.
    bf16 matrices are converted: fp16 could not hold their range."""
    if device == "cpu" and compute == torch.float32 and tensor.dtype == torch.float16 and tensor.dim() == 2:
        return torch.float16
    return compute


def load_model(model_dir: Path, device: str = "cpu", dtype: torch.dtype | None = None,
               dist: Dist = Dist(), weights: str = "dense") -> Transformer:
    """Build our model for this rank from a dense, W16A16S or W16A16SC folder.

    weights="sparse" (W16A16S or W16A16SC, CPU) holds the pruned linears as bitmap + nonzero values and
    expands them inside each product; weights="compressed" (W16A16SC only) keeps the linears as stored and
    decodes them on every forward.
    """
    if weights not in WEIGHT_MODES:
        raise SparsezipError(f"unknown weights mode {weights!r}; use one of {', '.join(WEIGHT_MODES)}")
    model_dir = Path(model_dir)
    kind = detect_kind(model_dir)
    args = ModelArgs.from_dir(model_dir)
    dtype = dtype or default_dtype(device)
    if weights == "sparse" and (kind not in (W16A16S, W16A16SC) or device != "cpu" or dtype != torch.float32):
        raise SparsezipError(f"--weights sparse needs a W16A16S or W16A16SC folder on the CPU (fp32 compute), "
                             f"but this is a {kind} folder on {device}; use --weights dense")
    state = rank_state(model_dir, args, dist, keep_compressed=weights == "compressed")
    with torch.device("meta"):
        model = Transformer(args, dist)
    keep_linears_compressed(model, state, device)
    if weights == "sparse":
        hold_linears_sparse(model, state, args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    for name, shape in expected.items():
        if name not in state:
            raise SparsezipError(f"{model_dir} lacks tensor {name}")
        if state[name].shape != shape:
            raise SparsezipError(f"{name} has shape {tuple(state[name].shape)} in {model_dir}, "
                                 f"config.json implies {tuple(shape)}")
    state = {k: state[k].to(device=device, dtype=held_dtype(k, state[k], dtype, device)) for k in expected}
    model.load_state_dict(state, strict=True, assign=True)
    del state
    release_freed_memory()
    log.info("loaded %s folder %s (rank %d of %d) on %s as %s", kind, model_dir, dist.rank, dist.size, device, dtype)
    return model.eval()
