"""A decode step's work between weight products, one native call each (native/decode.c): RMSNorm, SiLU(gate) * up,
and rotary attention of the new tokens against the KV cache.

model.py takes these for fp32 CPU tensors of a few rows (a decode step); prefill, other dtypes and devices keep the
torch operators. The rotary embedding is bit-identical to model.py's; norms and attention sum in their own order,
so decode steps match the torch path to float rounding, identically for every weight layout.
"""

from __future__ import annotations

import torch

from . import native, threads_for

MAX_ROWS = 64  # rows (tokens x batch) up to which the fused steps beat torch's vectorised operators


def fits(*tensors: torch.Tensor, rows: int) -> bool:
    """True when the fused steps can take these tensors: native kernels built, fp32 on the CPU, few rows."""
    return (native is not None and rows <= MAX_ROWS
            and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension."""
    x = x.contiguous()
    out = torch.empty_like(x)
    dim = x.shape[-1]
    native.rms_norm(x.numpy(), weight.detach().contiguous().numpy(), out.numpy(), x.numel() // dim, dim, eps)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2 * width] (gate, then up) -> silu(gate) * up [..., width]."""
    gate_up = gate_up.contiguous()
    width = gate_up.shape[-1] // 2
    out = torch.empty(gate_up.shape[:-1] + (width,), dtype=torch.float32)
    native.silu_mul(gate_up.numpy(), out.numpy(), gate_up.numel() // (2 * width), width)
    return out


def attend(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           pos: torch.Tensor, mask: torch.Tensor, heads: int) -> torch.Tensor:
    """Attention of a decode step: qkv [B, T, (heads + 2 kv_heads) * d]; cos, sin [T, d] or [B, 1, T, d]; caches
    [B, kv_heads, max_len, d], written at slots pos [T]; mask [B or 1, 1, T, used] -> [B, T, heads * d]."""
    B, T, _ = qkv.shape
    _, kv_heads, max_len, d = k_cache.shape
    used = mask.shape[-1]
    rope_rows = cos.shape[0] if cos.dim() == 4 else 1
    cos, sin = (t.reshape(rope_rows, T, d).contiguous() for t in (cos, sin))
    visible = mask.reshape(mask.shape[0], T, used).contiguous().view(torch.uint8)
    out = torch.empty(B, T, heads * d, dtype=torch.float32)
    native.attend(qkv.contiguous().numpy(), cos.numpy(), sin.numpy(), k_cache.numpy(), v_cache.numpy(),
                  pos.to(torch.int64).contiguous().numpy(), visible.numpy(), out.numpy(), B, T, heads, kv_heads, d,
                  max_len, used, rope_rows, visible.shape[0], threads_for(B * heads * T * used * d * 2))
    return out
