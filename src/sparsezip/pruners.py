"""Pruning methods as pure functions of a weight and its calibration statistics.

Each method takes W [out, in] in fp32 and the `LinearStats` of its input and returns the pruned
W (same shape, explicit zeros). Statistics are gathered by `calibrate.py`; nothing here runs the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .errors import SparsezipError
from .masks import apply_mask, make_mask


class LinearStats:
    """Running input statistics of one linear: token count and the squared norm of every input column."""

    def __init__(self, in_features: int, device):
        self.tokens = 0
        self.sq_norm = torch.zeros(in_features, dtype=torch.float64, device=device)  # sum_t x_tj^2

    def add_batch(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])  # [tokens, in]
        self.tokens += x.shape[0]
        self.sq_norm += x.double().pow(2).sum(0)


@dataclass(frozen=True)
class Method:
    prune: Callable[[torch.Tensor, LinearStats, float, tuple[int, int] | None], torch.Tensor]
    calibrated: bool  # False: needs no activations, so calibration forward passes are skipped
    description: str


def magnitude(w: torch.Tensor, stats: LinearStats | None, ratio: float, pattern) -> torch.Tensor:
    """Smallest |W| over the whole matrix (the classic baseline)."""
    return apply_mask(w, make_mask(w.abs(), ratio, pattern, per_row=False))


def wanda(w: torch.Tensor, stats: LinearStats, ratio: float, pattern) -> torch.Tensor:
    """Smallest |W_ij| * ||X_j|| compared within each output row (Sun et al. 2023)."""
    score = w.abs() * stats.sq_norm.sqrt().to(w)[None, :]
    return apply_mask(w, make_mask(score, ratio, pattern, per_row=True))


METHODS = {
    "magnitude": Method(magnitude, calibrated=False, description="|W|, ranked over each matrix"),
    "wanda": Method(wanda, calibrated=True, description="|W|*||X||, ranked within each output row"),
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise SparsezipError(f"unknown pruning method {name!r}; available: {', '.join(METHODS)}")
    return METHODS[name]
