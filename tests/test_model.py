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
