"""Perplexity over non-overlapping token windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import ModelArgs
from .errors import SparsezipError
from .model import Transformer


def check_eval_settings(args: ModelArgs, seqlen: int, batch_size: int, max_windows: int | None) -> None:
    """Refuse windows the model cannot score (a window predicts its tokens 2..L, within the context)."""
    if not 2 <= seqlen <= args.max_position_embeddings:
        raise SparsezipError(f"--seqlen must be from 2 to the model's context of {args.max_position_embeddings} "
                             f"tokens, got {seqlen}")
    if batch_size < 1:
        raise SparsezipError(f"--batch_size must be at least 1, got {batch_size}")
    if max_windows is not None and max_windows < 1:
        raise SparsezipError(f"--max_windows must be at least 1, got {max_windows}")


@torch.no_grad()
def window_losses(model: Transformer, windows: torch.Tensor, batch_size: int = 1,
                  show_progress: bool = True) -> torch.Tensor:
    """Each window's mean next-token loss, float64 [K]; every window is scored on its own."""
    device = model.model.norm.weight.device
    losses = []
    for start in tqdm(range(0, len(windows), batch_size), desc="eval", unit="batch", disable=not show_progress):
        batch = windows[start:start + batch_size].to(device)
        logits = model(batch).float()
        # over [tokens, vocab] rows: cross_entropy over the class axis of a [b, vocab, L] view loses ~1e-4 of the
        # perplexity in fp32 against a float64 reference
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                               reduction="none")
        losses.append(loss.view(len(batch), -1).double().mean(1).cpu())
    return torch.cat(losses)


def perplexity(model: Transformer, windows: torch.Tensor, batch_size: int = 1, show_progress: bool = True) -> float:
    """exp(mean next-token loss) over all windows [K, L] (of equal length, so the mean of their means)."""
    return math.exp(float(window_losses(model, windows, batch_size, show_progress).mean()))
