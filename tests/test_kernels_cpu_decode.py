"""The fused decode-step kernels against model.py's torch operators, and a whole decode step through either path."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from sparsezip.generate import SamplingParams, generate_batch
from sparsezip.kernels import cpu
from sparsezip.kernels.cpu import decode
from sparsezip.compress import compress
from sparsezip.model import SMALL_QUERY, KVCache, apply_rope, attention_mask, rope_cos_sin, small_query_attention
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


def test_attend_gives_the_same_floats_at_every_kernel_level():
    from conftest import kernel_levels

    class Args40(Args):
        head_dim = 40  # not a multiple of 8: the lanes' tail too

    heads, kv_heads, d, max_len, used = 6, 2, 40, 300, 257
    gen = torch.Generator().manual_seed(5)
    history = torch.randn(2, 1, kv_heads, max_len, d, generator=gen)
    pos = torch.tensor([used - 2, used - 1])
    cos, sin = rope_cos_sin(Args40, pos, torch.float32)
    mask = attention_mask(Args40, pos, used)
    qkv = torch.randn(1, 2, (heads + 2 * kv_heads) * d, generator=gen)
    outs = []
    for level in kernel_levels():
        with cpu.capped_level(level):
            k, v = history.clone()
            outs.append(decode.attend(qkv, cos, sin, k, v, pos, mask, heads))
    assert len(outs) >= 2 and all(torch.equal(outs[0], o) for o in outs[1:])


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


# ---------------------------------------------------------------- the whole decode step in one native call

WIDE = dict(hidden_size=256, intermediate_size=512)  # products of 64k+ multiply-adds: they run on the thread pool


@pytest.fixture(scope="module")
def sparse_folder(tiny_dir, tmp_path_factory):
    """Factory: a 50%-sparse (magnitude) W16A16S folder of a wide tiny model of `family`."""
    from sparsezip.config import SparsifyConfig
    from sparsezip.sparsify import sparsify

    made = {}

    def build(family):
        if family not in made:
            made[family] = sparsify(tiny_dir(family, **WIDE), tmp_path_factory.mktemp("sparse") / family,
                                    SparsifyConfig(method="magnitude", sparsity=0.5))
        return made[family]

    return build


def scripted_decode(model, one_call: bool) -> torch.Tensor:
    """Logits of a left-padded batch of two: a prefill, three one-token steps and one two-token step."""
    model.fuse_decode_steps = one_call
    gen = torch.Generator().manual_seed(3)
    total, width, pads = 24, 10, torch.tensor([0, 3])
    key_padding = torch.arange(total)[None, :] >= pads[:, None]
    model.setup_cache(2, total)
    slots = torch.arange(width)
    with torch.no_grad():
        logits = [model(torch.randint(3, 300, (2, width), generator=gen), slots, key_padding,
                        positions=(slots[None, :] - pads[:, None]).clamp(min=0))]
        for step in (1, 1, 1, 2):
            slot = torch.arange(width, width + step)
            logits.append(model(torch.randint(3, 300, (2, step), generator=gen), slot, key_padding,
                                positions=slot[None, :] - pads[:, None]))
            width += step
    model.clear_cache()
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("weights", ["dense", "sparse"])
def test_one_call_decode_step_is_bit_identical(tiny_dir, sparse_folder, family, weights, kernel_level, monkeypatch):
    """Every layer in one native call gives exactly the layer-by-layer path's logits (tied embeddings, q/k/v bias,
    q/k norms, a sliding window; fp16 and sparse weights; left padding; every kernel level)."""
    folder = tiny_dir(family, **WIDE) if weights == "dense" else sparse_folder(family)
    model = load_model(folder, "cpu", torch.float32, weights=weights)
    calls, one_call = [], decode.decoder_layers
    monkeypatch.setattr(decode, "decoder_layers", lambda *a, **k: calls.append(1) or one_call(*a, **k))
    expected = scripted_decode(model, one_call=False)
    assert not calls
    got = scripted_decode(model, one_call=True)
    assert len(calls) == 4  # every decode step, not the prefill
    assert torch.equal(got, expected)



def test_one_call_path_is_not_taken_where_it_cannot_compute(tiny_dir, sparse_folder):
    """fp32 weights (from a bf16 model), a prefill, other dtypes and uncached calls keep the layer-by-layer path."""
    model = load_model(tiny_dir("llama", dtype=torch.bfloat16), "cpu", torch.float32)
    model.setup_cache(1, 8)
    assert model.decode_plan is None
    dense = load_model(sparse_folder("llama"), "cpu", torch.float32)
    dense.setup_cache(1, 8)
    assert dense.decode_plan is not None
    x = torch.zeros(1, SMALL_QUERY + 1, dense.args.hidden_size)
    assert dense.fused_step(x[:, :1], cached=True) and not dense.fused_step(x, cached=True)
    assert not dense.fused_step(x[:, :1], cached=False) and not dense.fused_step(x[:, :1].double(), cached=True)
    dense.clear_cache()
    assert dense.decode_plan is None


@pytest.fixture(scope="module")
def packed_folder(sparse_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("packed") / "qwen2"
    compress(sparse_folder("qwen2"), folder, tp=1)
    return folder


def test_one_call_step_from_codec_streams_is_bit_identical(packed_folder, kernel_level, monkeypatch):
    """The compressed layout (each product straight from its tiles) in the one-call step gives the same logits."""
    model = load_model(packed_folder, "cpu", torch.float32, weights="compressed")
    calls, one_call = [], decode.decoder_layers
    monkeypatch.setattr(decode, "decoder_layers", lambda *a, **k: calls.append(1) or one_call(*a, **k))
    expected = scripted_decode(model, one_call=False)
    assert torch.equal(scripted_decode(model, one_call=True), expected) and len(calls) == 4


def test_one_call_step_reports_a_damaged_tile(packed_folder):
    model = load_model(packed_folder, "cpu", torch.float32, weights="compressed")
    model.setup_cache(1, 8)
    layer = list(model.decode_plan[0])
    kind, bias, codec_id, payload, offsets = layer[6]  # gate_up
    broken = payload.copy()
    broken[offsets[0]:offsets[1]] = 0xFF  # tile 0 overwritten
    layer[6] = (kind, bias, codec_id, broken, offsets)
    x, pos = torch.zeros(1, 1, model.args.hidden_size), torch.tensor([2])
    cos, sin = rope_cos_sin(model.args, pos, torch.float32)
    with pytest.raises(ValueError, match="tile 0"):
        decode.decoder_layers(x, [tuple(layer)], cos, sin, pos, attention_mask(model.args, pos, 3), 4, 512, 1e-6)


def test_one_call_step_refuses_inconsistent_buffers(tiny_dir):
    model = load_model(tiny_dir("llama"), "cpu", torch.float32)
    model.setup_cache(1, 8)
    layer = list(model.decode_plan[0])
    layer[8] = layer[8][:, :, :4].copy()  # a cache shorter than the others
    x, pos = torch.zeros(1, 1, model.args.hidden_size), torch.tensor([2])
    cos, sin = rope_cos_sin(model.args, pos, torch.float32)
    mask = attention_mask(model.args, pos, 3)
    with pytest.raises(ValueError, match="v_cache has 1024 bytes, expected 512"):
        decode.decoder_layers(x, [tuple(layer)], cos, sin, pos, mask, 4, 128, 1e-6)
    layer = list(model.decode_plan[0])
    layer[4] = layer[4][:2] + (layer[4][2][:-1],)  # a qkv weight one row short
    with pytest.raises(ValueError, match="qkv"):
        decode.decoder_layers(x, [tuple(layer)], cos, sin, pos, mask, 4, 128, 1e-6)
