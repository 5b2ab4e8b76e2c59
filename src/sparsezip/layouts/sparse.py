"""Layout "sparse": a pruned fp16 matrix as a bitmap (a byte per group of 8 columns) plus its nonzero values (one byte each
for E5M2-valued, L2-rounded weights; see kernels/cpu/gemv.py's SparseWeight), expanded in registers inside each product. Inputs
of many rows unpack the weight as fp32 into the model's shared scratch buffer for torch's matmul. Same numbers as
the dense layout."""

from __future__ import annotations

import torch

from ..kernels.cpu.decode import sparse_product
from ..kernels.cpu.gemv import SparseWeight, pack_sparse, sparse_linear
from ..formats import FolderKind
from .base import FolderFacts, LayoutContext, LinearSource, Scratch, WeightLayout


class SparseLinear(WeightLayout):
    folder_kinds = (FolderKind.W16A16S, FolderKind.W16A16SC)

    def __init__(self, sparse: SparseWeight, bias: torch.Tensor | None, scratch: Scratch):
        super().__init__()
        self.out_features, self.in_features = sparse.shape
        self.sparse = sparse  # numpy arrays, not part of the state dict
        self.bias = bias
        self.scratch = scratch

    @classmethod
    def supports(cls, device: str, dtype: torch.dtype) -> bool:
        return device == "cpu" and dtype == torch.float32

    @classmethod
    def build(cls, source: LinearSource, bias: torch.Tensor | None, ctx: LayoutContext) -> SparseLinear:
        sparse = pack_sparse(source.weight())
        ctx.scratch.reserve(sparse.shape[0] * sparse.shape[1], torch.float32)
        return cls(sparse, bias, ctx.scratch)

    @classmethod
    def estimated_bits(cls, facts: FolderFacts) -> float:
        """A 2-byte code per 8 weights and a 4-byte tile offset per 128, then 1 byte per value after L2 rounding (plus
        the groups that keep 2) or 2 bytes otherwise."""
        density = 1.0 - facts.sparsity
        return 2.0 + 0.25 + density * (9.5 if facts.l2_rounded else 16.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.sparse.shape
        return sparse_linear(x, self.sparse, self.bias, lambda: self.scratch.view((n, k), torch.float32))

    def resident_bytes(self) -> int:
        return self.sparse.nbytes + self.bias_bytes(self.bias)

    def native_product(self) -> tuple | None:
        return sparse_product(self.bias, self.sparse.arrays())

    def uses_scratch(self) -> Scratch:
        return self.scratch
