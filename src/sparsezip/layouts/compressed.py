"""Layout "compressed": the stored codec stream itself (after one checked decode at load, so a damaged file
fails then, not in the middle of a reply), decoded on the data path of every forward: straight from the tiles
for the few rows of a CPU decode step (each tile decoded once per call), else into the model's shared scratch
buffer. Same numbers as the dense layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import codec
from ..kernels.cpu.decode import codec_product
from ..kernels.cpu.gemv import gemv_max_rows, mixed_linear
from ..formats import FolderKind
from .base import FolderFacts, LayoutContext, LinearSource, Scratch, WeightLayout


# Most activation rows multiplied straight from the tiles. That product walks each tile row's compact values again
# for every pass of 8 rows, so from a few passes on, decoding the matrix once into the scratch buffer (fp16) and
# running the dense kernel over it is faster (the crossover measured between 16 and 32 rows: BENCHMARKS.md).
TILE_PRODUCT_MAX_ROWS = 24


class CompressedLinear(WeightLayout):
    folder_kinds = (FolderKind.W16A16SC,)
    needs_stream = True

    def __init__(self, stored: codec.EncodedWeight, bias: torch.Tensor | None, scratch: Scratch):
        super().__init__()
        self.out_features, self.in_features = stored.shape
        self.stored = stored  # plain tensors, not buffers: they are not part of the state dict
        self.opened = codec.open_weight(stored, check_crc=False)  # build() decoded it, CRC checked, once
        self.bias = bias
        self.scratch = scratch

    @classmethod
    def supports(cls, device: str, dtype: torch.dtype) -> bool:
        return True

    @classmethod
    def build(cls, source: LinearSource, bias: torch.Tensor | None, ctx: LayoutContext) -> CompressedLinear:
        source.weight()  # one full checked decode
        ctx.scratch.reserve(source.shape[0] * source.shape[1], ctx.dtype)
        return cls(source.stored, bias, ctx.scratch)

    @classmethod
    def estimated_bits(cls, facts: FolderFacts) -> float:
        return facts.stored_bits or 16.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        rows = x.numel() // k
        if x.device.type == "cpu" and x.dtype == torch.float32 and rows <= gemv_max_rows(n * k):
            if rows > TILE_PRODUCT_MAX_ROWS:  # a prompt: decoded once as fp16, then the dense kernel's bands
                return mixed_linear(x, self.decoded(torch.float16), self.bias)
            # the few rows of a decode step: multiply straight from the tiles, each decoded once, no scratch write
            y = codec.linear(x.reshape(-1, k), self.opened, self.bias)
            return y.view(*x.shape[:-1], n)
        return F.linear(x, self.decoded(x.dtype), self.bias)

    def native_product(self) -> tuple | None:
        stream = codec.native_stream(self.opened)
        if stream is None:
            return None  # codec.linear decodes such streams and calls F.linear
        return codec_product(self.bias, stream.codec_id, stream.payload, stream.offsets)

    def decoded(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight in the scratch buffer as `dtype` (decoded straight to fp32 for a CPU matmul of many rows, to
        fp16 for the native kernel's; other dtypes, such as bf16, through a decoded fp16 copy)."""
        out = self.scratch.view((self.out_features, self.in_features), dtype)
        if out.device.type == "cpu" and dtype in (torch.float16, torch.float32):  # CRC-checked once at load
            return codec.decode_into(self.stored, out, check_crc=False)
        return out.copy_(codec.decode(self.stored.weight, self.stored.index, self.stored.info))

    def resident_bytes(self) -> int:
        return self.stored.nbytes + self.bias_bytes(self.bias)

    def uses_scratch(self) -> Scratch:
        return self.scratch
