"""The fused decode-step kernels against model.py's torch operators, and a whole decode step through either path."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from sparsezip.generate import SamplingParams, generate_batch
from sparsezip.kernels import cpu
from sparsezip.kernels.cpu import decode
from sparsezip.model import KVCache, apply_rope, attention_mask, rope_cos_sin, small_query_attention
from sparsezip.runtime import load_model

GREEDY = SamplingParams(max_new_tokens=10)
pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C extension")


def torch_rms_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 2, 576), (5, 7)])
def test_rms_norm_matches_torch(shape):
    x = torch.randn(*shape) * 3
    w = torch.randn(shape[-1])
    torch.testing.assert_close(decode.rms_norm(x, w, 1e-6), torch_rms_norm(x, w, 1e-6), rtol=1e-6, atol=1e-6)


def test_silu_mul_matches_torch():
    gate_up = torch.randn(2, 3, 2 * 40) * 4
    gate, up = gate_up.split(40, dim=-1)
    torch.testing.assert_close(decode.silu_mul(gate_up), F.silu(gate) * up, rtol=1e-6, atol=1e-6)


def reference_attend(qkv, cos, sin, cache, pos, mask, heads, kv_heads, d):
    """model.py's torch path: rope, cache update, small-query attention."""
    B, T, _ = qkv.shape
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q = apply_rope(q.view(B, T, heads, d).transpose(1, 2), cos, sin)
    k = apply_rope(k.view(B, T, kv_heads, d).transpose(1, 2), cos, sin)
    k, v = cache.update(pos, k, v.view(B, T, kv_heads, d).transpose(1, 2), used=mask.shape[-1])
    return small_query_attention(q, k, v, mask).transpose(1, 2).reshape(B, T, heads * d)


class Args:  # what rope_cos_sin and attention_mask read
    head_dim, rope_theta, rope_scaling, sliding_window = 16, 10000.0, None, None


@pytest.mark.parametrize("batch, tokens, per_row", [(1, 1, False), (3, 2, True), (2, 4, False)])
def test_attend_matches_the_torch_path(batch, tokens, per_row):
    heads, kv_heads, d, max_len, filled = 6, 2, 16, 40, 11
    gen = torch.Generator().manual_seed(batch * 10 + tokens)
    mine, theirs = (KVCache(batch, kv_heads, max_len, d, torch.float32, "cpu") for _ in range(2))
    history = torch.randn(2, batch, kv_heads, filled, d, generator=gen)
    for cache in (mine, theirs):  # earlier steps' keys and values
        cache.k[:, :, :filled], cache.v[:, :, :filled] = history
    pos = torch.arange(filled, filled + tokens)
    used = filled + tokens
    positions = pos + torch.arange(batch)[:, None] if per_row else pos  # left padding shifts rows' positions
    cos, sin = rope_cos_sin(Args, positions, torch.float32)
    padding = torch.ones(batch, used, dtype=torch.bool)
    padding[-1, :3] = False  # the last row starts later
    mask = attention_mask(Args, pos, used, padding if per_row else None)
    qkv = torch.randn(batch, tokens, (heads + 2 * kv_heads) * d, generator=gen)
    got = decode.attend(qkv, cos, sin, mine.k, mine.v, pos, mask, heads)
    want = reference_attend(qkv, cos, sin, theirs, pos, mask, heads, kv_heads, d)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(mine.k, theirs.k) and torch.equal(mine.v, theirs.v)  # the same rotary floats in the cache


def test_attend_refuses_inconsistent_buffers():
    qkv, cos = torch.randn(1, 1, 8 * 4), torch.randn(1, 8)
    cache = torch.zeros(1, 1, 4, 8)
    mask = torch.ones(1, 1, 1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="attend"):
        decode.attend(qkv, cos, cos, cache, cache.clone(), torch.tensor([7]), mask, 2)  # slot 7 of 4
    with pytest.raises(ValueError, match="attend"):
        decode.attend(qkv[..., :-8], cos, cos, cache, cache.clone(), torch.tensor([1]), mask, 2)  # qkv too short


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_decode_steps_agree_with_the_torch_operators(tiny_dir, family, monkeypatch):
    """Generation through the fused kernels gives the torch operators' logits (to rounding) and greedy tokens."""
    model = load_model(tiny_dir(family), "cpu", torch.float32)
    prompt = list(range(5, 17))

    def run():
        model.setup_cache(1, 40)
        with torch.no_grad():
            model(torch.tensor([prompt]), pos=torch.arange(12))
            return model(torch.tensor([[21]]), pos=torch.tensor([12]))

    fused = run()
    tok = AutoTokenizer.from_pretrained(tiny_dir(family))
    fused_tokens = generate_batch(model, tok, [prompt], GREEDY, set())[0].tokens
    monkeypatch.setattr(decode, "MAX_ROWS", 0)  # nothing fits: every step takes the torch operators
    torch.testing.assert_close(fused, run(), rtol=1e-5, atol=1e-5)
    assert generate_batch(model, tok, [prompt], GREEDY, set())[0].tokens == fused_tokens
