"""Layout "dense": the fp16 matrix itself, decoded once at load. Also the model's own linear class, so every
unpruned linear (lm_head) is a dense layout too."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..kernels.cpu.decode import dense_product
from ..kernels.cpu.gemv import mixed_linear
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
    """nn.Linear whose weight may stay fp16 under fp32 activations on the CPU (native fp16 GEMV for few rows)."""

    folder_kinds = ALL_KINDS

    @classmethod
    def supports(cls, device: str, dtype: torch.dtype) -> bool:
        return True

    @classmethod
    def build(cls, source: LinearSource, bias: torch.Tensor | None, ctx: LayoutContext) -> DenseLinear:
        weight = source.weight()
        n, k = weight.shape
        with torch.device("meta"):
            layer = cls(k, n, bias=bias is not None)
        layer.weight = nn.Parameter(hold(weight, ctx.dtype, ctx.device), requires_grad=False)
        if bias is not None:
            layer.bias = nn.Parameter(bias, requires_grad=False)
        return layer

    @classmethod
    def estimated_bits(cls, facts: FolderFacts) -> float:
        return 16.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mixed_linear(x, self.weight, self.bias)

    def native_product(self) -> tuple | None:
        return dense_product(self.bias, self.weight)

    def resident_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + self.bias_bytes(self.bias)
