"""Layout "dense": the fp16 matrix itself, decoded once at load. Also the model's own linear class, so every
unpruned linear (lm_head) is a dense layout too."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..kernels.cpu.decode import dense_product
from ..kernels.cpu.gemv import block_columns, blocked_linear, blocks_columns, mixed_linear
from ..formats import FolderKind
from .base import FolderFacts, LayoutContext, LinearSource, WeightLayout

ALL_KINDS = tuple(FolderKind)


def held_dtype(tensor: torch.Tensor, compute: torch.dtype, device: str) -> torch.dtype:
    """The dtype a tensor is held in: fp16 matrices stay fp16 under fp32 CPU compute (the products and the
    embedding convert on the fly, and a decode step reads half the bytes); everything else takes the compute
    dtype. bf16 matrices are converted: fp16 could not hold their range."""
    if device == "cpu" and compute == torch.float32 and tensor.dtype == torch.float16 and tensor.dim() == 2:
        return torch.float16
    return compute


NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32}


def hold(tensor: torch.Tensor, compute: torch.dtype, device: str) -> torch.Tensor:
    """A copy of `tensor` in its held dtype on `device`. On the CPU the copy lives in memory that numpy allocates:
    numpy asks Linux for transparent huge pages on large arrays and torch's allocator does not, and a decode step
    streams every weight from memory faster out of 2 MiB pages than out of 4 KiB ones (fewer TLB misses, and the
    hardware prefetchers stop at page ends)."""
    dtype = held_dtype(tensor, compute, device)
    if device != "cpu" or dtype not in NUMPY_DTYPES:
        return tensor.to(device, dtype)
    held = torch.from_numpy(np.empty(tuple(tensor.shape), NUMPY_DTYPES[dtype]))
    held.copy_(tensor)
    return held


class DenseLinear(nn.Linear, WeightLayout):
    """nn.Linear whose weight may stay fp16 under fp32 activations on the CPU (native fp16 GEMV for few rows).
    A wide one built by `build` there holds its weight flat in column blocks (`column_blocked`; kernels/cpu/gemv.py's
    block_columns), which only its own products read."""

    folder_kinds = ALL_KINDS
    column_blocked = False

    @classmethod
    def supports(cls, device: str, dtype: torch.dtype) -> bool:
        return True

    @classmethod
    def build(cls, source: LinearSource, bias: torch.Tensor | None, ctx: LayoutContext) -> DenseLinear:
        weight = source.weight()
        n, k = weight.shape
        with torch.device("meta"):
            layer = cls(k, n, bias=bias is not None)
        # only CPU matrices are held in fp16 under fp32 compute
        layer.column_blocked = held_dtype(weight, ctx.dtype, ctx.device) == torch.float16 and blocks_columns(k)
        if layer.column_blocked:  # in numpy's memory too, for the same huge pages
            held = torch.from_numpy(np.empty(n * k, np.float16)).copy_(block_columns(weight))
        else:
            held = hold(weight, ctx.dtype, ctx.device)
        layer.weight = nn.Parameter(held, requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias, requires_grad=False)
        return layer

    @classmethod
    def estimated_bits(cls, facts: FolderFacts) -> float:
        return 16.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.column_blocked:
            return blocked_linear(x, self.weight, self.out_features, self.bias)
        return mixed_linear(x, self.weight, self.bias)

    def native_product(self) -> tuple | None:
        return dense_product(self.bias, self.weight, self.column_blocked)

    def resident_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + self.bias_bytes(self.bias)
