"""Safetensors I/O that every step shares: lazy per-tensor reads, streaming sharded writes, atomic output folders.

Reads are per tensor, so a step holds one layer at a time. Every output folder is written into a temporary
sibling and renamed into place only when complete. What the folders hold and how their files are named is
formats.py's business.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from .config import write_json
from .errors import SparsezipError

log = logging.getLogger("sparsezip")

DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
          "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
          "BOOL": torch.bool}


def read_safetensors_header(path: Path) -> tuple[int, dict[str, dict]]:
    """(data start, {name: {dtype, shape, data_offsets}}) of a safetensors file, validated against its size.

    Parsed here rather than through a memory map so that reading a checkpoint tensor by tensor never
    leaves the whole file resident in this process (sparsify's memory must stay bounded).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise SparsezipError(f"{path} is not a readable safetensors file (truncated or corrupt header)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise SparsezipError(f"{path} has a corrupt safetensors header") from None
    header.pop("__metadata__", None)
    end = 0
    for name, entry in header.items():
        begin, stop = entry.get("data_offsets", (0, -1))
        dtype = DTYPES.get(entry.get("dtype"))
        numel = math.prod(entry.get("shape", [-1]))
        if dtype is None or stop - begin != numel * dtype.itemsize or begin < 0:
            raise SparsezipError(f"{path}: tensor {name} has an inconsistent header entry")
        end = max(end, stop)
    if 8 + n + end != size:
        raise SparsezipError(f"{path} is truncated or has trailing bytes ({size} bytes, header says {8 + n + end})")
    return 8 + n, header


class TensorReader:
    """Lazy, per-tensor access to tensors spread over one or more safetensors files."""

    def __init__(self, files: list[Path]):
        self.headers: dict[Path, tuple[int, dict]] = {}
        self.where: dict[str, Path] = {}
        for path in files:
            if not path.is_file():
                raise SparsezipError(f"weight file {path} is missing")
            self.headers[path] = read_safetensors_header(path)
            for name in self.headers[path][1]:
                if name in self.where:
                    raise SparsezipError(f"tensor {name} appears in both {self.where[name]} and {path}")
                self.where[name] = path

    def names(self) -> list[str]:
        return list(self.where)

    def nbytes(self, name: str) -> int:
        """A tensor's stored size, from the header."""
        _, begin, stop, _ = self.locate(name)
        return stop - begin

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from the header."""
        return tuple(self.locate(name)[3]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        """A tensor's element type, from the header."""
        return DTYPES[self.locate(name)[3]["dtype"]]

    def file_of(self, name: str) -> Path:
        """The file that holds a tensor."""
        return self.locate(name)[0]

    def locate(self, name: str) -> tuple[Path, int, int, dict]:
        """(file, first byte, end byte, header entry) of a tensor."""
        if name not in self.where:
            files = sorted(self.headers)
            more = f" (and {len(files) - 1} more files)" if len(files) > 1 else ""
            raise SparsezipError(f"tensor {name} is missing from {files[0] if files else 'the checkpoint'}{more}")
        path = self.where[name]
        start, header = self.headers[path]
        begin, stop = header[name]["data_offsets"]
        return path, start + begin, start + stop, header[name]

    def get(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """A fresh tensor read with one positioned read (no memory map kept); with `rows` (a step-1 slice of the
        first dimension) only those rows are read: a rank's share of a 1 GB embedding table, not the table."""
        path, begin, stop, entry = self.locate(name)
        dtype, shape = DTYPES[entry["dtype"]], list(entry["shape"])
        if rows is not None:
            first, last, step = rows.indices(shape[0]) if shape else (0, 0, 0)
            if step != 1:
                raise ValueError(f"rows must be a step-1 slice of the first dimension, got {rows}")
            row_bytes = (stop - begin) // max(1, shape[0])
            begin, stop, shape[0] = begin + first * row_bytes, begin + max(first, last) * row_bytes, max(0, last - first)
        data = bytearray(stop - begin)  # read into place: bytearray(f.read()) would hold the tensor twice
        with open(path, "rb") as f:
            f.seek(begin)
            got = f.readinto(data)
        if got != stop - begin:
            raise SparsezipError(f"{path} was truncated while reading {name}")
        if not data:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(shape)

    def mapped(self, name: str) -> torch.Tensor:
        """The tensor as a private memory map of its file: a page is read when first touched, so the rows of an
        embedding table that no token uses take no memory. Copy-on-write, so nothing written reaches the file."""
        path, begin, stop, entry = self.locate(name)
        dtype = DTYPES[entry["dtype"]]
        if stop == begin or begin % dtype.itemsize:  # empty, or misaligned for its element type
            return self.get(name)
        try:
            data = np.memmap(path, dtype=np.uint8, mode="c", offset=begin, shape=(stop - begin,))
        except (ValueError, OSError) as e:
            raise SparsezipError(f"{path} cannot be mapped for {name} (truncated since it was opened?): {e}") from None
        return torch.from_numpy(data).view(dtype).reshape(entry["shape"])


def to_fp16(name: str, t: torch.Tensor) -> torch.Tensor:
    """Bring a bf16/fp32 source tensor to fp16, warning when values overflow the fp16 range."""
    if t.dtype == torch.float16:
        return t
    if not t.is_floating_point():
        raise SparsezipError(f"tensor {name} has dtype {t.dtype}; only float checkpoints are supported")
    out = t.to(torch.float16)
    overflow = int((torch.isinf(out) & torch.isfinite(t)).sum())
    if overflow:
        log.warning("%s: %d values exceed the fp16 range and became inf", name, overflow)
    return out


def save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with a failed write (disk full, file too large) as a one-line error."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        raise SparsezipError(f"could not write {path}: {e}") from None


class ShardedWriter:
    """Writes tensors as they are produced into safetensors files of at most `max_bytes` each.

    Tensors are flushed in small chunk files so memory stays bounded whatever the shard size; `close`
    streams the chunks into the final shards (a safetensors header needs every offset up front).
    """

    CHUNK_BYTES = 16 * 2**20  # bounds the memory held for writing (save_file also makes one copy)

    def __init__(self, folder: Path, stem: str, max_bytes: int):
        self.folder, self.stem, self.max_bytes = folder, stem, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.chunks: list[Path] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= min(self.CHUNK_BYTES, self.max_bytes):
            self.flush()

    def flush(self) -> None:
        if self.pending:
            chunk = self.folder / f".{self.stem}.chunk{len(self.chunks)}"
            save_tensors(self.pending, chunk)
            self.chunks.append(chunk)
            self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        """Merge the chunks into shards and write the Hugging Face index when there are several."""
        self.flush()
        groups: list[list[Path]] = [[]]
        size = 0
        for chunk in self.chunks:
            chunk_size = chunk.stat().st_size
            if groups[-1] and size + chunk_size > self.max_bytes:
                groups.append([])
                size = 0
            groups[-1].append(chunk)
            size += chunk_size
        n = len(groups)
        names = [f"{self.stem}.safetensors"] if n == 1 else [
            f"{self.stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map, total = {}, 0
        for name, group in zip(names, groups):
            tensors = merge_safetensors(group, self.folder / name)
            weight_map.update(dict.fromkeys(tensors, name))
            total += sum(tensors.values())
        if n > 1:
            write_json(self.folder / f"{self.stem}.safetensors.index.json",
                       {"metadata": {"total_size": total}, "weight_map": weight_map})


def merge_safetensors(chunks: list[Path], out: Path) -> dict[str, int]:
    """Concatenate safetensors files into one, copying data in blocks; returns {name: bytes}. Deletes the chunks."""
    parsed = [read_safetensors_header(c) for c in chunks]
    header, sizes, base = {}, {}, 0
    for _, entries in parsed:
        for name, e in entries.items():
            begin, stop = e["data_offsets"]
            header[name] = {"dtype": e["dtype"], "shape": e["shape"], "data_offsets": [base + begin, base + stop]}
            sizes[name] = stop - begin
        base += max((e["data_offsets"][1] for e in entries.values()), default=0)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data start to 8 bytes
    with open(out, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for chunk, (start, _) in zip(chunks, parsed):
            with open(chunk, "rb") as src:
                src.seek(start)
                shutil.copyfileobj(src, f, 16 * 2**20)
            chunk.unlink()
    return sizes


def check_output_path(out: Path, overwrite: bool, inputs: tuple[Path, ...]) -> Path:
    """Refuse to clobber an existing folder (unless asked) and never let an output replace an input."""
    out = Path(out).resolve()
    for src in inputs:
        src = Path(src).resolve()
        if out == src or out in src.parents:
            raise SparsezipError(f"output {out} would overwrite the input {src}; choose another path")
        if src in out.parents:  # the input would change under the run, and hold its own output afterwards
            raise SparsezipError(f"output {out} lies inside the input {src}; choose a path outside it")
    if out.exists() and not overwrite:
        raise SparsezipError(f"{out} already exists; choose another path or pass --overwrite")
    return out


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temp_dirs(out: Path) -> None:
    """Remove the temporary siblings of `out` left by runs that were killed outright (SIGKILL, power loss): their
    names carry the pid of the process that made them, and that process is gone."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.tmp-(\d+)-")
    for path in out.parent.iterdir():
        found = pattern.match(path.name)
        if found and path.is_dir() and not process_alive(int(found.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            log.warning("removed %s, left by an earlier run (process %s) that was killed", path, found.group(1))


def new_temp_dir(out: Path) -> Path:
    """A temporary sibling of `out`, so the final rename stays on one filesystem; its name carries our pid, so a
    later run can tell that it was abandoned."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_dirs(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); the published folder is an ordinary one
    return tmp


def publish(tmp: Path, out: Path) -> None:
    """Move a finished temporary folder into place, replacing an old output only at the very end."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextmanager
def atomic_output_dir(out: Path, overwrite: bool = False, inputs: tuple[Path, ...] = ()) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes `out`, on any error it disappears."""
    out = check_output_path(out, overwrite, inputs)
    tmp = new_temp_dir(out)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    publish(tmp, out)


M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h)
LARGE_ALLOCATION = 1 << 20


def map_large_allocations(threshold: int = LARGE_ALLOCATION) -> None:
    """Give every allocation of `threshold` bytes or more a mapping of its own, returned to the OS when freed.

    glibc otherwise raises this threshold to the largest block freed so far (up to 32 MiB) and serves the blocks
    below it from a heap that keeps what is freed and fragments: sparsify's calibration batches and the per-sample
    and per-head blocks of the attention (1-15 MB from 1.5B to 7B) then stay resident beside a layer's Hessian.
    Smaller blocks stay on the heap, where mapping each would cost its page faults again. Process-wide, like every
    allocator setting; a no-op where the C library is not glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):
        pass


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise): after each sparsified layer, so peak RSS
    does not creep up layer after layer, and after loading a model, whose transient copies are gone."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
