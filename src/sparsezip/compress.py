"""`compress`: split a W16A16S folder for tensor parallelism and encode every rank's pruned linears.

Each rank's tensors come from the same TP table the loader uses (tp.py), so a part holds exactly the
per-rank fused tensors our model expects. The codec runs tile by tile. In one process `tp` parts are built
one after another; under torchrun every process builds its own part and rank 0 publishes the folder once
every rank succeeded.
"""

from __future__ import annotations

import logging
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from tqdm import tqdm

from . import __version__, codec
from .checkpoint import TensorReader, check_output_path, new_temp_dir, publish, to_fp16
from .config import ModelArgs
from .errors import SparsezipError
from .formats import (TOKENIZER_FILES, Description, FolderKind, PartWriter, check_weights_match_config,
                      copy_side_files, detect_kind, has_tokenizer, linear_prefix, part_dir_name, part_metadata,
                      read_description, weight_files, write_fp16_config)
from .tp import Dist, SplitRule, all_rules, check_tp_size, rank_share, shard

log = logging.getLogger("sparsezip")
T, R = TypeVar("T"), TypeVar("R")


@dataclass(frozen=True)
class Source:
    """An opened, validated W16A16S folder."""

    path: Path
    args: ModelArgs
    reader: TensorReader
    description: Description

    @classmethod
    def open(cls, path: Path) -> Source:
        path = Path(path)
        if detect_kind(path) != FolderKind.W16A16S:
            raise SparsezipError(f"{path} is not a W16A16S folder (run `sparsezip sparsify` first)")
        reader = TensorReader(weight_files(path))
        description = read_description(path, FolderKind.W16A16S)  # also checks it against the weights
        args = ModelArgs.from_dir(path)
        check_weights_match_config(reader, args, path)
        return cls(path, args, reader, description)

    def read(self, name: str) -> torch.Tensor:
        return to_fp16(name, self.reader.get(name))

    def read_shard(self, rule: SplitRule, rank: int, tp: int) -> torch.Tensor:
        """This rank's tensor for `rule`. A one-source split along the rows (the embedding table, lm_head) reads
        only the rank's rows: at 7B the whole table is 1 GB."""
        if tp == 1 or rule.dim != 0 or len(rule.sources) != 1:
            return shard(rule, self.read, rank, tp)
        name = rule.sources[0]
        rows = rank_share(self.reader.shape(name)[0], rank, tp)
        return to_fp16(name, self.reader.get(name, rows=rows))

    def is_sparse(self, rule: SplitRule) -> bool:
        return rule.compressed and any(self.description.is_sparse(s) for s in rule.sources)


@dataclass
class PartStats:
    dense_bytes: int = 0  # fp16 bytes of the compressed linears
    packed_bytes: int = 0  # .weight + .index + .info bytes of the same
    weights: int = 0

    def add(self, other: PartStats) -> None:
        self.dense_bytes += other.dense_bytes
        self.packed_bytes += other.packed_bytes
        self.weights += other.weights


def encode_rule(src: Source, rule: SplitRule, rank: int, tp: int, codec_name: str,
                verify: bool) -> tuple[str, torch.Tensor | codec.EncodedWeight, PartStats]:
    """One per-rank entry: (tensor name, FLOAT tensor) or (linear prefix, its encoded weight)."""
    tensor = src.read_shard(rule, rank, tp)
    if not src.is_sparse(rule):
        return rule.target, tensor, PartStats()
    enc = codec.encode(tensor, codec_name)
    if verify:
        decoded = codec.decode(enc.weight, enc.index, enc.info)
        if not torch.equal(decoded.view(torch.int16), tensor.view(torch.int16)):
            raise SparsezipError(f"--verify: {rule.target} of rank {rank} did not decode bit for bit")
    return linear_prefix(rule.target), enc, PartStats(tensor.numel() * 2, enc.nbytes, tensor.numel())


def bounded_map(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: list[T], workers: int) -> Iterator[R]:
    """pool.map in order, but with at most 2 x workers results in flight: Executor.map submits every item at
    once, so encoded tensors would pile up in memory whenever writing falls behind encoding."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= 2 * max(1, workers):
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def build_part(src: Source, rank: int, tp: int, out: Path, codec_name: str, workers: int, verify: bool,
               show_progress: bool = True) -> PartStats:
    """Write part{rank}-of-{tp}/ inside `out`."""
    rules = list(all_rules(src.args))
    stats = PartStats()
    metadata = part_metadata(tp, rank, codec.get_codec(codec_name), f"sparsezip {__version__}",
                             src.description.metadata)
    part = PartWriter(out / part_dir_name(rank, tp), metadata)
    with ThreadPoolExecutor(max(1, workers)) as pool:  # numpy and the native coder release the GIL
        jobs = bounded_map(pool, lambda r: encode_rule(src, r, rank, tp, codec_name, verify), rules, workers)
        for name, value, part_stats in tqdm(jobs, total=len(rules), desc=f"compress rank {rank}/{tp}",
                                            unit="tensor", disable=not show_progress):
            part.add(name, value)
            stats.add(part_stats)
    part.close()
    return stats


def write_root_files(src: Source, out: Path, tp: int) -> None:
    write_fp16_config(src.path, out, FolderKind.W16A16SC, tp)
    copy_side_files(src.path, out)
    if not has_tokenizer(src.path):
        log.warning("%s has no tokenizer files (%s): the compressed folder will need one copied in before it can "
                    "run", src.path, ", ".join(TOKENIZER_FILES))


def log_summary(stats: PartStats) -> None:
    if stats.weights:
        log.info("compressed linears: %.1f MB fp16 -> %.1f MB (%.1f%%, %.2f bits/weight)",
                 stats.dense_bytes / 1e6, stats.packed_bytes / 1e6, 100 * stats.packed_bytes / stats.dense_bytes,
                 8 * stats.packed_bytes / stats.weights)


def compress(model_path: Path, save_directory: Path, tp: int | None = None, workers: int = 1,
             verify: bool = False, codec_name: str = codec.DEFAULT_CODEC, overwrite: bool = False,
             dist: Dist = Dist()) -> PartStats:
    """Compress a W16A16S folder into W16A16SC parts for TP size `tp` (default: 1, or the torchrun world size),
    published atomically. Under torchrun (`dist` from tp.process_group) each process builds its own part."""
    if workers < 1:
        raise SparsezipError(f"--workers must be at least 1, got {workers}")
    if dist.size > 1:
        if tp not in (None, dist.size):
            raise SparsezipError(f"--tp {tp} disagrees with the {dist.size} torchrun processes; drop --tp")
        return compress_ranks(model_path, save_directory, dist, workers, verify, codec_name, overwrite)
    tp = 1 if tp is None else tp
    src = open_source(model_path, tp, codec_name)
    out = check_output_path(save_directory, overwrite, (src.path,))
    tmp = new_temp_dir(out)
    total = PartStats()
    try:
        for rank in range(tp):
            total.add(build_part(src, rank, tp, tmp, codec_name, workers, verify))
        write_root_files(src, tmp, tp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, out)
    log_summary(total)
    return total


def open_source(model_path: Path, tp: int, codec_name: str) -> Source:
    """The validated input, refusing a TP size or codec that cannot work before any encoding."""
    src = Source.open(model_path)
    check_tp_size(src.args, tp)
    codec.get_codec(codec_name)
    return src


def compress_ranks(model_path: Path, save_directory: Path, dist: Dist, workers: int, verify: bool, codec_name: str,
                   overwrite: bool) -> PartStats:
    """Under torchrun: each rank writes its own part; rank 0 publishes once every rank succeeded."""
    import torch.distributed as tdist

    tmp_holder: list = [None]
    error: BaseException | None = None
    try:
        src = open_source(model_path, dist.size, codec_name)
        if dist.is_main:
            out = check_output_path(save_directory, overwrite, (src.path,))
            tmp_holder = [str(new_temp_dir(out))]
    except BaseException as e:  # every rank must reach the collectives below, or the others hang
        error = e
    tdist.broadcast_object_list(tmp_holder, src=0)
    stats = PartStats()
    if error is None and tmp_holder[0] is not None:
        try:
            stats = build_part(src, dist.rank, dist.size, Path(tmp_holder[0]), codec_name, workers, verify,
                               show_progress=dist.is_main)
        except BaseException as e:
            error = e
    ok = torch.tensor([0 if error else 1])
    tdist.all_reduce(ok, op=tdist.ReduceOp.MIN)
    if dist.is_main and tmp_holder[0] is not None:
        if ok.item():
            write_root_files(src, Path(tmp_holder[0]), dist.size)
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
