"""`inspect`: sizes, sparsity and bits per weight of any folder kind."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import TensorReader
from .formats import FLOAT, WEIGHT, FolderKind, PartReader, detect_kind, part_dirs, read_description, weight_files
from .layouts.base import LinearSource


@dataclass(frozen=True)
class Row:
    name: str
    kind: str  # FLOAT, W16A16S, W16A16SC or dense
    shape: tuple[int, ...]
    stored_bytes: int
    zeros: int

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.stored_bytes / max(self.numel, 1)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def count_zeros(t: torch.Tensor, chunk: int = 2**22) -> int:
    """Entries equal to +0.0, the only value the codec leaves out (-0.0 is stored); counted in chunks, since the
    boolean temporaries of a whole embedding table would take gigabytes at 7B."""
    flat = t.reshape(-1)
    return sum(int(((c == 0) & ~c.signbit()).sum()) for c in flat.split(chunk))


def dense_rows(folder: Path, kind: FolderKind) -> list[Row]:
    reader = TensorReader(weight_files(folder))
    desc = read_description(folder, kind).tensors if kind == FolderKind.W16A16S else {}
    rows = []
    for name in reader.names():
        t = reader.get(name)
        rows.append(Row(name, desc.get(name, str(kind)), tuple(t.shape), nbytes(t), count_zeros(t)))
    return rows


def part_rows(part_dir: Path) -> list[Row]:
    part = PartReader(part_dir)
    rows = []
    for name, is_linear in part.contents():
        if not is_linear:
            t = part.read_float(name)
            rows.append(Row(f"{part_dir.name}/{name}", FLOAT, tuple(t.shape), nbytes(t), count_zeros(t)))
            continue
        source = LinearSource(name, part.file, stored=part.read_linear(name))
        w = source.weight()  # a checked decode: a damaged tensor is named
        rows.append(Row(f"{part_dir.name}/{name}{WEIGHT}", str(FolderKind.W16A16SC), tuple(w.shape),
                        source.stored.nbytes, count_zeros(w)))
    return rows


def inspect_folder(folder: Path) -> tuple[FolderKind, list[Row]]:
    kind = detect_kind(Path(folder))
    if kind == FolderKind.W16A16SC:
        return kind, [row for part in part_dirs(Path(folder)) for row in part_rows(part)]
    return kind, dense_rows(Path(folder), kind)


def format_report(kind: FolderKind, rows: list[Row], per_tensor: bool = True) -> str:
    lines = []
    if per_tensor:
        lines.append(f"{'tensor':64} {'type':9} {'shape':>14} {'bytes':>11} {'sparsity':>8} {'bits/w':>6}")
        for r in rows:
            shape = "x".join(map(str, r.shape))
            lines.append(f"{r.name:64} {r.kind:9} {shape:>14} {r.stored_bytes:>11,} "
                         f"{r.zeros / max(r.numel, 1):>8.1%} {r.bits_per_weight:>6.2f}")
    total = sum(r.stored_bytes for r in rows)
    lines.append(f"folder kind: {kind}; {len(rows)} tensors; {total / 1e6:.2f} MB of weights")
    sparse = [r for r in rows if r.kind in (FolderKind.W16A16S, FolderKind.W16A16SC)]
    if sparse:
        n = sum(r.numel for r in sparse)
        stored = sum(r.stored_bytes for r in sparse)
        zeros = sum(r.zeros for r in sparse)
        lines.append(f"sparse linears: {n:,} weights, sparsity {zeros / n:.1%}, {stored / 1e6:.2f} MB "
                     f"= {8 * stored / n:.2f} bits/weight ({stored / (2 * n):.1%} of fp16)")
    return "\n".join(lines)
