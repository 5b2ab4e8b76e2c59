"""Perplexity over non-overlapping token windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .model import Transformer


@torch.no_grad()
def perplexity(model: Transformer, windows: torch.Tensor, batch_size: int = 1, show_progress: bool = True) -> float:
    """exp(mean next-token loss) over all windows [K, L]; every window is scored on its own."""
    device = model.model.norm.weight.device
    total, count = 0.0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="eval", unit="batch", disable=not show_progress):
        batch = windows[start:start + batch_size].to(device)
        logits = model(batch).float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                               reduction="sum")
        total += float(loss)
        count += batch[:, 1:].numel()
    return math.exp(total / count)
