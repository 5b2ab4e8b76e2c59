"""`compress`: split a W16A16S checkpoint for tensor parallelism and encode every rank's linears.

Each rank first takes its shard through the TP table (the same one the loader uses), then
encodes its fused linears tile by tile. In one process `--tp N` builds all N parts; under
torchrun every process builds its own part and rank 0 publishes the folder.
"""

from __future__ import annotations

import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from . import __version__, codec
from .checkpoint import (COMPRESSED_FILE, DESCRIPTION, FORMAT_VERSION, W16A16S, W16A16SC, TensorReader,
                         check_output_path, copy_side_files,
                         detect_kind, new_temp_dir, publish, read_description, safetensors_files, to_fp16,
                         write_fp16_config)
from .config import ModelArgs, write_json
from .errors import SparsezipError
from .tp import Dist, SplitRule, all_rules, check_tp_size, shard

log = logging.getLogger("sparsezip")
DEFAULT_CODEC = "huff-v2"


@dataclass(frozen=True)
class Source:
    """An opened, validated W16A16S folder."""

    path: Path
    args: ModelArgs
    reader: TensorReader
    description: dict

    @classmethod
    def open(cls, path: Path) -> "Source":
        path = Path(path)
        if detect_kind(path) != W16A16S:
            raise SparsezipError(f"{path} is not a W16A16S folder (run `sparsezip sparsify` first)")
        reader = TensorReader(safetensors_files(path))
        description = read_description(path, W16A16S)  # also checks it against the weights
        return cls(path, ModelArgs.from_dir(path), reader, description)

    def read(self, name: str) -> torch.Tensor:
        return to_fp16(name, self.reader.get(name))

    def is_sparse(self, rule: SplitRule) -> bool:
        return rule.compressed and any(self.description.get(s) == W16A16S for s in rule.sources)


@dataclass
class PartStats:
    dense_bytes: int = 0  # fp16 bytes of the compressed linears
    packed_bytes: int = 0  # .weight + .index + .info bytes of the same
    weights: int = 0

    def add(self, other: "PartStats") -> None:
        self.dense_bytes += other.dense_bytes
        self.packed_bytes += other.packed_bytes
        self.weights += other.weights


def encode_rule(src: Source, rule: SplitRule, rank: int, tp: int, codec_name: str,
                verify: bool) -> tuple[dict[str, torch.Tensor], dict, PartStats]:
    """One per-rank tensor: FLOAT as is, or a sparse linear as .weight/.index/.info."""
    tensor = shard(rule, src.read, rank, tp)
    if not src.is_sparse(rule):
        return {rule.target: tensor}, {rule.target: "FLOAT"}, PartStats()
    enc = codec.encode(tensor, codec_name)
    if verify:
        decoded = codec.decode(enc.weight, enc.index, enc.info)
        if not torch.equal(decoded.view(torch.int16), tensor.view(torch.int16)):
            raise SparsezipError(f"--verify: {rule.target} of rank {rank} did not decode bit for bit")
    prefix = rule.target[: -len(".weight")]
    tensors = {prefix + ".weight": enc.weight, prefix + ".index": enc.index, prefix + ".info": enc.info}
    desc = {name: W16A16SC for name in tensors} | {prefix + ".weight.outdim": int(tensor.shape[0])}
    packed = sum(t.numel() * t.element_size() for t in tensors.values())
    return tensors, desc, PartStats(tensor.numel() * 2, packed, tensor.numel())


def write_part(src: Source, rank: int, tp: int, out: Path, codec_name: str, workers: int, verify: bool,
               show_progress: bool = True) -> PartStats:
    """Build part{rank}-of-{tp}/ inside `out`."""
    chosen = codec.get_codec(codec_name)
    rules = list(all_rules(src.args))
    tensors, stats = {}, PartStats()
    description = {
        "model_quant_type": W16A16SC, "version": FORMAT_VERSION,
        "metadata": {"tp_size": tp, "rank": rank, "codec": chosen.name, "codec_version": chosen.version,
                     "codec_id": chosen.codec_id, "tool": f"sparsezip {__version__}",
                     "sparsify": src.description.get("metadata", {})},
    }
    with ThreadPoolExecutor(max(1, workers)) as pool:  # numpy releases the GIL in the heavy encode steps
        jobs = pool.map(lambda r: encode_rule(src, r, rank, tp, codec_name, verify), rules)
        for part_tensors, part_desc, part_stats in tqdm(jobs, total=len(rules), desc=f"compress rank {rank}/{tp}",
                                                        unit="tensor", disable=not show_progress):
            tensors.update(part_tensors)
            description.update(part_desc)
            stats.add(part_stats)
    part = out / f"part{rank}-of-{tp}"
    part.mkdir()
    save_file(tensors, str(part / COMPRESSED_FILE))
    write_json(part / DESCRIPTION, description)
    return stats


def write_root_files(src: Source, out: Path) -> None:
    write_fp16_config(src.path, out)
    copy_side_files(src.path, out)


def log_summary(stats: PartStats) -> None:
    if stats.weights:
        log.info("compressed linears: %.1f MB fp16 -> %.1f MB (%.1f%%, %.2f bits/weight)",
                 stats.dense_bytes / 1e6, stats.packed_bytes / 1e6, 100 * stats.packed_bytes / stats.dense_bytes,
                 8 * stats.packed_bytes / stats.weights)


def compress(model_path: Path, save_directory: Path, tp: int = 1, workers: int = 1, verify: bool = False,
             codec_name: str = DEFAULT_CODEC, overwrite: bool = False) -> PartStats:
    """All parts in this process, published atomically."""
    src = Source.open(model_path)
    check_tp_size(src.args, tp)
    codec.get_codec(codec_name)
    out = check_output_path(save_directory, overwrite, (src.path,))
    tmp = new_temp_dir(out)
    total = PartStats()
    try:
        for rank in range(tp):
            total.add(write_part(src, rank, tp, tmp, codec_name, workers, verify))
        write_root_files(src, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, out)
    log_summary(total)
    return total


def compress_distributed(model_path: Path, save_directory: Path, dist: Dist, tp: int | None = None,
                         workers: int = 1, verify: bool = False, codec_name: str = DEFAULT_CODEC,
                         overwrite: bool = False) -> PartStats:
    """Under torchrun: each rank writes its own part; rank 0 publishes once every rank succeeded."""
    import torch.distributed as tdist

    if tp not in (None, dist.size):
        raise SparsezipError(f"--tp {tp} disagrees with the {dist.size} torchrun processes; drop --tp")
    tmp_holder: list = [None]
    error: BaseException | None = None
    try:
        src = Source.open(model_path)
        check_tp_size(src.args, dist.size)
        codec.get_codec(codec_name)
        if dist.is_main:
            out = check_output_path(save_directory, overwrite, (src.path,))
            tmp_holder = [str(new_temp_dir(out))]
    except BaseException as e:  # every rank must reach the collectives below, or the others hang
        error = e
    tdist.broadcast_object_list(tmp_holder, src=0)
    stats = PartStats()
    if error is None and tmp_holder[0] is not None:
        try:
            stats = write_part(src, dist.rank, dist.size, Path(tmp_holder[0]), codec_name, workers, verify,
                               show_progress=dist.is_main)
        except BaseException as e:
            error = e
    ok = torch.tensor([0 if error else 1])
    tdist.all_reduce(ok, op=tdist.ReduceOp.MIN)
    if dist.is_main and tmp_holder[0] is not None:
        if ok.item():
            write_root_files(src, Path(tmp_holder[0]))
            publish(Path(tmp_holder[0]), Path(save_directory).resolve())
        else:
            shutil.rmtree(tmp_holder[0], ignore_errors=True)
    if error is not None:
        raise error
    if not ok.item():
        raise SparsezipError("another rank failed; nothing was written")
    totals = torch.tensor([stats.dense_bytes, stats.packed_bytes, stats.weights], dtype=torch.int64)
    tdist.all_reduce(totals)  # the summary covers every rank's part, not just rank 0's
    total = PartStats(*totals.tolist())
    if dist.is_main:
        log_summary(total)
    return total
