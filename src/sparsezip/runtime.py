"""Load any folder kind into our model, on a device and a tensor-parallel rank.

Dense and W16A16S folders are split with the TP table at load time; a W16A16SC part already
holds this rank's fused tensors and only needs its linears decoded. Either way the model
receives identical per-rank tensors, which is why W16A16S and W16A16SC outputs agree bit for bit.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import codec
from .checkpoint import (COMPRESSED_FILE, W16A16S, W16A16SC, TensorReader, detect_kind, part_dirs,
                         read_description, safetensors_files)
from .config import ModelArgs
from .errors import SparsezipError
from .model import Transformer
from .tp import Dist, all_rules, check_tp_size, shard

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


def read_part(part_dir: Path) -> dict[str, torch.Tensor]:
    """Decode one W16A16SC part into fused fp16 tensors (read_description checks it against the file)."""
    desc = read_description(part_dir, W16A16SC)
    reader = TensorReader([part_dir / COMPRESSED_FILE])
    where = part_dir / COMPRESSED_FILE
    return {name: reader.get(name) if kind == "FLOAT" else decode_linear(reader, name, where)
            for name, kind in codec_entries(desc)}


def decode_linear(reader: TensorReader, name: str, where: Path) -> torch.Tensor:
    """Decode one compressed linear, naming file and tensor in any codec error (a CRC mismatch, say),
    so the user learns which part is damaged."""
    prefix = name[: -len(".weight")]
    try:
        return codec.decode(reader.get(name), reader.get(prefix + ".index"), reader.get(prefix + ".info"))
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


def rank_state(model_dir: Path, args: ModelArgs, dist: Dist) -> dict[str, torch.Tensor]:
    kind = detect_kind(model_dir)
    if kind != W16A16SC:
        return rank_state_from_dense(model_dir, args, dist)
    parts = part_dirs(model_dir)
    if len(parts) != dist.size:
        raise SparsezipError(
            f"{model_dir} was compressed for TP={len(parts)} but this run has {dist.size} process(es); "
            f"launch with: torchrun --nproc_per_node {len(parts)} -m sparsezip ..."
        )
    return read_part(parts[dist.rank])


def load_model(model_dir: Path, device: str = "cpu", dtype: torch.dtype | None = None,
               dist: Dist = Dist()) -> Transformer:
    """Build our model for this rank from a dense, W16A16S or W16A16SC folder."""
    model_dir = Path(model_dir)
    kind = detect_kind(model_dir)
    args = ModelArgs.from_dir(model_dir)
    dtype = dtype or default_dtype(device)
    state = rank_state(model_dir, args, dist)
    with torch.device("meta"):
        model = Transformer(args, dist)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    for name, shape in expected.items():
        if name not in state:
            raise SparsezipError(f"{model_dir} lacks tensor {name}")
        if state[name].shape != shape:
            raise SparsezipError(f"{name} has shape {tuple(state[name].shape)} in {model_dir}, "
                                 f"config.json implies {tuple(shape)}")
    state = {k: state[k].to(device=device, dtype=dtype) for k in expected}
    model.load_state_dict(state, strict=True, assign=True)
    log.info("loaded %s folder %s (rank %d of %d) on %s as %s", kind, model_dir, dist.rank, dist.size, device, dtype)
    return model.eval()
