"""A decode step's work between weight products, one native call each (native/decode.c): RMSNorm, SiLU(gate) * up,
and rotary attention of the new tokens against the KV cache; and a whole decode step through every layer in one
native call (native/layer.c), the same kernels in the same order.

model.py takes these for fp32 CPU tensors of a few rows (a decode step); prefill, other dtypes and devices keep the
torch operators. The rotary embedding is bit-identical to model.py's; norms and attention sum in their own order,
so decode steps match the torch path to float rounding, identically for every weight layout.
"""

from __future__ import annotations

import numpy as np
import torch

from . import native, threads, threads_for

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


def attention_inputs(cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, tokens: int,
                     head_dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """cos, sin [T, d] or [B, 1, T, d]; pos [T]; mask [B or 1, 1, T, used] (bool) -> the native kernels' cos and sin
    [rope_rows, T, d], pos int64, mask uint8 [mask_rows, T, used], and rope_rows."""
    rope_rows = cos.shape[0] if cos.dim() == 4 else 1
    cos, sin = (t.reshape(rope_rows, tokens, head_dim).contiguous().numpy() for t in (cos, sin))
    visible = mask.reshape(mask.shape[0], tokens, mask.shape[-1]).contiguous().view(torch.uint8).numpy()
    return cos, sin, pos.to(torch.int64).contiguous().numpy(), visible, rope_rows


def attend(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
           pos: torch.Tensor, mask: torch.Tensor, heads: int) -> torch.Tensor:
    """Attention of a decode step: qkv [B, T, (heads + 2 kv_heads) * d]; cos, sin [T, d] or [B, 1, T, d]; caches
    [B, kv_heads, max_len, d], written at slots pos [T]; mask [B or 1, 1, T, used] -> [B, T, heads * d]."""
    B, T, _ = qkv.shape
    _, kv_heads, max_len, d = k_cache.shape
    used = mask.shape[-1]
    cos, sin, pos, visible, rope_rows = attention_inputs(cos, sin, pos, mask, T, d)
    out = torch.empty(B, T, heads * d, dtype=torch.float32)
    native.attend(qkv.contiguous().numpy(), cos, sin, k_cache.numpy(), v_cache.numpy(), pos, visible, out.numpy(), B,
                  T, heads, kv_heads, d, max_len, used, rope_rows, visible.shape[0],
                  threads_for(B * heads * T * used * d * 2))
    return out


# One decode step through every layer in one native call (native/layer.c). A layer is the tuple that layer_step
# builds, a product what dense_product, sparse_product or codec_product build.
Product = tuple


def native_bias(bias: torch.Tensor | None) -> np.ndarray | None:
    return None if bias is None else bias.detach().contiguous().numpy()


def takes_bias(bias: torch.Tensor | None) -> bool:
    """Whether the one-call step can add this bias: none, or an fp32 CPU vector."""
    return bias is None or (bias.dtype == torch.float32 and bias.device.type == "cpu")


def dense_product(bias: torch.Tensor | None, weight: torch.Tensor, blocked: bool) -> Product | None:
    """A contiguous fp16 CPU matrix (in column blocks when `blocked`), as the native GEMV takes it; None when the call
    cannot take it."""
    if (weight.dtype != torch.float16 or weight.device.type != "cpu" or not weight.is_contiguous()
            or not takes_bias(bias)):
        return None
    return native.PRODUCT_DENSE, native_bias(bias), weight.detach().numpy(), blocked


def sparse_product(bias: torch.Tensor | None, arrays: tuple[np.ndarray, ...]) -> Product | None:
    """A SparseWeight's arrays (codes, values, row_start, chunk_start)."""
    return (native.PRODUCT_SPARSE, native_bias(bias), *arrays) if takes_bias(bias) else None


def codec_product(bias: torch.Tensor | None, codec_id: int, payload: np.ndarray, offsets: np.ndarray) -> Product | None:
    """A validated codec stream (codec.OpenStream's id, payload and tile offsets), multiplied from its tiles."""
    return (native.PRODUCT_CODEC, native_bias(bias), codec_id, payload, offsets) if takes_bias(bias) else None


def layer_step(norms: tuple[torch.Tensor, ...], qk_norms: tuple[torch.Tensor, torch.Tensor] | None,
               products: tuple[Product | None, ...], k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple | None:
    """One layer for decoder_layers: (input_norm, post_attention_norm), optional (q_norm, k_norm) weights, the
    (qkv, o, gate_up, down) products and the layer's KV cache; None when some part is not fp32 / native."""
    vectors = norms + (qk_norms or ())
    if any(p is None for p in products) or not fits(*vectors, k_cache, v_cache, rows=1):
        return None
    q_norm, k_norm = (v.detach().contiguous().numpy() for v in qk_norms) if qk_norms else (None, None)
    return (*(v.detach().contiguous().numpy() for v in norms), q_norm, k_norm, *products, k_cache.numpy(),
            v_cache.numpy())


def decoder_layers(x: torch.Tensor, layers: list[tuple], cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                   mask: torch.Tensor, heads: int, width: int, eps: float) -> torch.Tensor:
    """x [B, T, hidden] after every layer of `layers` (built by layer_step), in a new tensor; the caches are written
    as the per-layer path writes them."""
    B, T, hidden = x.shape
    k_cache = layers[0][8]
    _, kv_heads, max_len, d = k_cache.shape
    used = mask.shape[-1]
    cos, sin, pos, visible, rope_rows = attention_inputs(cos, sin, pos, mask, T, d)
    out = x.clone(memory_format=torch.contiguous_format)
    native.decoder_layers(out.numpy(), layers, cos, sin, pos, visible, B, T, hidden, heads, kv_heads, d, width,
                          max_len, used, rope_rows, visible.shape[0], eps, threads())
    return out
