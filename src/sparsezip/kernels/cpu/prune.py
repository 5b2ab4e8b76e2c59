"""Pruning kernels in native code (native/prune.c) for CPU tensors, each with a torch path as its reference.

obs_block: SparseGPT's per-column OBS loop over one lazy block. The torch loop (pruners._prune_block) costs a few
small ops per column; here each row range runs the whole block in an L1-sized buffer. Same rules, results equal
up to fp32 summation order.
kth_smallest: torch.kthvalue's value, by histograms of the float bits (float_sparse's whole-matrix masks).
"""

from __future__ import annotations

import torch

from . import native, threads

MAX_BLOCK = 256  # as native/prune.c's MAX_B


def applies(w1: torch.Tensor) -> bool:
    """Whether obs_block can take this block ([b, rows] fp32): the extension is built and the data is on the CPU."""
    return (native is not None and w1.device.type == "cpu" and w1.dtype == torch.float32
            and w1.is_contiguous() and w1.shape[0] <= MAX_BLOCK)


def obs_block(w1: torch.Tensor, h1: torch.Tensor, dead1: torch.Tensor, prune_k: int,
              pattern: tuple[int, int] | None) -> torch.Tensor:
    """Prune one block in place (w1 [b, rows], transposed columns of W; masked on return) and return the errors
    [b, rows] for the lazy update of later blocks. Unstructured: prune_k per row; N:M: `pattern` (n, m)."""
    b, rows = w1.shape
    n, m = pattern or (0, 0)
    err1 = torch.empty_like(w1)
    native.obs_block(w1.numpy(), h1.contiguous().numpy(), dead1.to(torch.uint8).numpy(), err1.numpy(), b, rows,
                     prune_k, n, m, threads())
    return err1


def kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest (1-based) entry of a 1-D tensor, as a 0-dim tensor of its dtype: torch.kthvalue's value
    (values are exact, so both paths agree bit for bit), natively for contiguous fp32 CPU tensors."""
    if native is None or flat.device.type != "cpu" or flat.dtype != torch.float32 or not flat.is_contiguous():
        return torch.kthvalue(flat, k).values
    return torch.tensor(native.kth_smallest(flat.numpy(), k), dtype=torch.float32)
