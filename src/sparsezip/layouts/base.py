"""The interface every weight layout implements, and what a loader hands it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .. import codec
from ..errors import SparsezipError
from ..formats import FolderKind


@dataclass
class LinearSource:
    """What a folder holds for one pruned linear of this rank: its fp16 weight [n, k], or its codec stream."""

    name: str  # the linear's prefix, e.g. model.layers.0.mlp.down_proj
    where: Path  # the file it comes from, for error messages
    dense: torch.Tensor | None = None
    stored: codec.EncodedWeight | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.dense.shape) if self.dense is not None else self.stored.shape

    def weight(self) -> torch.Tensor:
        """The fp16 weight: as read, or decoded with every check (CRC included)."""
        if self.dense is not None:
            return self.dense
        try:
            return codec.decode(self.stored.weight, self.stored.index, self.stored.info)
        except SparsezipError as e:  # name the damaged part and tensor
            raise SparsezipError(f"{self.where}: {self.name}.weight: {e}") from None


class Scratch:
    """One buffer shared by all linears of a model that need a decoded weight for a moment, so resident weight
    memory stays the layouts' own bytes plus the largest single matrix. Allocated on first use."""

    def __init__(self, device: str):
        self.device = device
        self.nbytes = 0
        self.buffer: torch.Tensor | None = None  # uint8

    def reserve(self, numel: int, dtype: torch.dtype) -> None:
        self.nbytes = max(self.nbytes, numel * dtype.itemsize)

    def view(self, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        """The first rows x cols elements of the buffer as `dtype` [rows, cols]."""
        if self.buffer is None or self.buffer.numel() < self.nbytes:
            self.buffer = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device)
        return self.buffer[: shape[0] * shape[1] * dtype.itemsize].view(dtype).view(shape)


@dataclass(frozen=True)
class FolderFacts:
    """What `auto` knows about a folder's pruned linears before loading them, to estimate each layout's bytes."""

    kind: FolderKind
    sparsity: float = 0.0  # the fraction of pruned weights that are zero
    l2_rounded: bool = False  # values are E5M2 (low byte 0) but for about 2% kept exact
    stored_bits: float | None = None  # bits per weight of the codec streams (W16A16SC)


@dataclass
class LayoutContext:
    """What the layouts of one loaded model share."""

    device: str
    dtype: torch.dtype  # the compute dtype of the activations
    scratch: Scratch = field(init=False)

    def __post_init__(self) -> None:
        self.scratch = Scratch(self.device)


class InferenceOnly(torch.autograd.Function):
    """A layout's product where autograd records (a plain forward in transformers, outside torch.no_grad): computed
    on the detached input, since the native kernels read tensors as numpy arrays; a backward pass through it is
    refused, as a gradient that silently skipped the pruned linears would be wrong."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: WeightLayout) -> torch.Tensor:
        return layer(x.detach())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise SparsezipError("sparsezip's pruned linears are for inference: gradients through them are not "
                             "supported")


class WeightLayout(nn.Module):
    """A linear layer whose weight is held in one layout. Subclasses set the class attributes and implement
    `build`, `forward` and `resident_bytes`; every layout computes what nn.Linear computes on the same weight."""

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return InferenceOnly.apply(x, self)
        return super().__call__(x, *args, **kwargs)

    folder_kinds: ClassVar[tuple[FolderKind, ...]]  # the folder kinds it loads from
    needs_stream: ClassVar[bool] = False  # builds from the codec stream, not from the fp16 weight
    in_features: int
    out_features: int

    @classmethod
    def supports(cls, device: str, dtype: torch.dtype) -> bool:
        """Whether it runs on this device (cpu, cuda[:i]) with activations of this dtype."""
        raise NotImplementedError

    @classmethod
    def build(cls, source: LinearSource, bias: torch.Tensor | None, ctx: LayoutContext) -> WeightLayout:
        raise NotImplementedError

    def resident_bytes(self) -> int:
        """Bytes this layer holds for its weight and bias (not the shared scratch)."""
        raise NotImplementedError

    @classmethod
    def estimated_bits(cls, facts: FolderFacts) -> float:
        """About how many bits per weight this layout would hold for a folder with these facts."""
        raise NotImplementedError

    def uses_scratch(self) -> Scratch | None:
        return None

    def native_product(self) -> tuple | None:
        """This product as the one-call decode step takes it (kernels/cpu/decode.py's dense_product, sparse_product or
        codec_product), or None when that call cannot compute it (the model then calls the layers one by one)."""
        return None

    @staticmethod
    def bias_bytes(bias: torch.Tensor | None) -> int:
        return 0 if bias is None else bias.numel() * bias.element_size()
