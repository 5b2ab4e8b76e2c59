"""Our decoder must match transformers' logits on every supported family."""

import pytest
import torch

from sparsezip.runtime import load_model


def hf_logits(folder, tokens):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return ref(tokens).logits


@pytest.mark.parametrize("family", ["llama", "llama3", "qwen2", "qwen3", "mistral"])
def test_logits_match_transformers(tiny_dir, family):
    folder = tiny_dir(family)
    tokens = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    ours = load_model(folder, "cpu", torch.float32)
    with torch.no_grad():
        got = ours(tokens)
    want = hf_logits(folder, tokens)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_kv_cache_decode_matches_full_forward(tiny_dir):
    model = load_model(tiny_dir("qwen3"), "cpu", torch.float32)
    tokens = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        model.setup_cache(1, 32)
        steps = [model(tokens[:, :8], torch.arange(8))[:, -1]]
        for t in range(8, 12):
            steps.append(model(tokens[:, t:t + 1], torch.tensor([t]))[:, -1])
        model.clear_cache()
    torch.testing.assert_close(torch.stack(steps[:-1], 1), full[:, 7:11], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("x_dtype, table_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                                  (torch.float16, torch.float32)])
def test_apply_rope_is_the_rotate_half_formula_bit_for_bit(x_dtype, table_dtype):
    """apply_rope writes rotate_half into one buffer; it must give exactly x*cos + cat(-x2, x1)*sin, also on a
    strided q view of a fused qkv output and with per-row tables."""
    from sparsezip.model import apply_rope

    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 7, 5 * 8, generator=g).to(x_dtype)
    x = qkv[..., :3 * 8].view(2, 7, 3, 8).transpose(1, 2)  # [B, heads, T, head_dim], not contiguous
    for shape in [(7, 8), (2, 1, 7, 8)]:
        cos, sin = torch.randn(shape, generator=g).to(table_dtype), torch.randn(shape, generator=g).to(table_dtype)
        want = x * cos + torch.cat((-x[..., 4:], x[..., :4]), dim=-1) * sin
        got = apply_rope(x, cos, sin)
        assert got.dtype == want.dtype and torch.equal(got, want)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("tp", [1, 2])
def test_unshard_rebuilds_every_hugging_face_tensor_from_the_rank_pieces(tiny_dir, family, tp):
    from sparsezip.checkpoint import TensorReader
    from sparsezip.config import ModelArgs
    from sparsezip.errors import SparsezipError
    from sparsezip.formats import weight_files
    from sparsezip.tp import all_rules, shard, source_shapes, unshard

    folder = tiny_dir(family)
    args, reader = ModelArgs.from_dir(folder), TensorReader(weight_files(folder))
    rebuilt = {}
    for rule in all_rules(args):
        rebuilt.update(unshard(rule, [shard(rule, reader.get, r, tp) for r in range(tp)], source_shapes(args)))
    assert sorted(rebuilt) == sorted(source_shapes(args))
    for name, tensor in rebuilt.items():
        assert torch.equal(tensor, reader.get(name)), name
    qkv = next(r for r in all_rules(args) if r.target.endswith("qkv_proj.weight"))
    with pytest.raises(SparsezipError, match="config.json implies"):
        list(unshard(qkv, [shard(qkv, reader.get, 0, 2)], source_shapes(args)))  # a half piece for a whole one
