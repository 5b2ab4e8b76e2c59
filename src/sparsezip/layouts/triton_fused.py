"""Layout "compressed" on CUDA: the codec tiles live on the GPU and a Triton kernel decompresses them in
registers inside the matmul (batches up to 16; larger ones decode, then call cuBLAS)."""

from __future__ import annotations

import torch

from ..formats import FolderKind
from .base import FolderFacts, LayoutContext, LinearSource, WeightLayout
from .compressed import CompressedLinear


def triton_kernels(device: str):
    """The Triton kernel module when it can serve `device` (a CUDA GPU with triton installed), else None."""
    if not device.startswith("cuda"):
        return None
    try:
        from ..kernels.triton import codec as triton_codec
    except ImportError:
        return None
    return triton_codec if triton_codec.available(device) else None


class FusedCompressedLinear(WeightLayout):
    folder_kinds = (FolderKind.W16A16SC,)
    needs_stream = True

    def __init__(self, kernels, device_weight, bias: torch.Tensor | None):
        super().__init__()
        self.kernels = kernels  # the kernels.triton.codec module (tests pass an interpreter build of it)
        self.device_weight = device_weight  # built by kernels.prepare()
        self.in_features, self.out_features = device_weight.k, device_weight.n
        self.bias = bias

    @classmethod
    def supports(cls, device: str, dtype: torch.dtype) -> bool:
        return triton_kernels(device) is not None

    @classmethod
    def build(cls, source: LinearSource, bias: torch.Tensor | None, ctx: LayoutContext) -> WeightLayout:
        """The fused layer, or the reference-decode one for a codec without a Triton kernel."""
        kernels = triton_kernels(ctx.device)
        if int(source.stored.info[4]) not in kernels.KERNEL_CODECS:
            return CompressedLinear.build(source, bias, ctx)
        source.weight()  # one full checked decode, so prepare need not verify again
        return cls(kernels, kernels.prepare(source.stored, ctx.device, verify=False), bias)

    @classmethod
    def estimated_bits(cls, facts: FolderFacts) -> float:
        return facts.stored_bits or 16.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.kernels.linear(x, self.device_weight)
        return y + self.bias if self.bias is not None else y

    def resident_bytes(self) -> int:
        return self.device_weight.nbytes + self.bias_bytes(self.bias)
