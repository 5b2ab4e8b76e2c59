"""bench/quality.py and its llama.cpp helpers: the GGUF bits-per-weight count, the float64 NLL sum of the
llama.cpp worker, the bits of our layouts on a tiny folder, the plot's lines; and, when .venv-peers exists,
llama.cpp's perplexity against ours on a tiny model."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import llamacpp  # noqa: E402
import llamacpp_worker  # noqa: E402
import quality  # noqa: E402


def test_window_nll_is_the_summed_next_token_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(9, 50, generator=gen, dtype=torch.float64) * 4
    tokens = torch.randint(0, 50, (9,), generator=gen)
    want = F.cross_entropy(logits[:-1], tokens[1:], reduction="sum").item()
    assert llamacpp_worker.window_nll(logits.float().numpy(), tokens.tolist()) == pytest.approx(want, rel=1e-6)


def test_window_nll_scores_the_next_token_not_the_current_one():
    tokens = [3, 1, 4, 1, 5]
    logits = np.full((5, 8), -50.0, dtype=np.float32)
    logits[np.arange(4), tokens[1:]] = 50.0  # row i is sure of token i + 1
    assert llamacpp_worker.window_nll(logits, tokens) < 1e-6
    uniform = np.zeros((5, 8), dtype=np.float32)
    assert llamacpp_worker.window_nll(uniform, tokens) == pytest.approx(4 * math.log(8))


def test_linear_bits_counts_only_the_2d_blk_tensors(tmp_path):
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("token_embd.weight", rng.standard_normal((32, 64)).astype(np.float16))  # not a layer matrix
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, dtype=np.float32))  # 1-D: not counted
    w.add_tensor("blk.0.attn_q.weight", rng.standard_normal((64, 64)).astype(np.float16))  # 64*64*2 bytes
    for name, qtype in (("blk.0.ffn_down.weight", gguf.GGMLQuantizationType.Q8_0),  # 34 bytes per 32 weights
                        ("blk.0.ffn_up.weight", gguf.GGMLQuantizationType.Q4_0)):  # 18 bytes per 32 weights
        data = gguf.quants.quantize(rng.standard_normal((64, 64)).astype(np.float32), qtype)
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    found = llamacpp.linear_bits(path)
    stored = 64 * 64 * 2 + 64 * 2 * 34 + 64 * 2 * 18
    assert found["tensors"] == 3 and found["weights"] == 3 * 64 * 64 and found["bytes"] == stored
    assert found["bits_per_weight"] == pytest.approx((16 + 8.5 + 4.5) / 3)


def test_series_are_per_layout_and_rounding_in_order_of_sparsity():
    points = [
        quality.Point("dense fp16", 20.0, {"own": 16.0}),
        quality.Point("float_sparse", 30.0, {"sparse": 7.0, "huff-v2": 4.0}, 0.5, "l2"),
        quality.Point("float_sparse", 22.0, {"sparse": 9.0, "huff-v2": 5.0}, 0.3, "l2"),
        quality.Point("float_sparse", 29.0, {"sparse": 10.0}, 0.5, "none"),
        quality.Point("llama.cpp Q4_0", 25.0, {"own": 4.5}),
    ]
    lines = quality.series(points, ["sparse", "huff-v2"])
    assert lines == {("sparse", "l2"): [(9.0, 22.0, 0.3), (7.0, 30.0, 0.5)],
                     ("huff-v2", "l2"): [(5.0, 22.0, 0.3), (4.0, 30.0, 0.5)],
                     ("sparse", "none"): [(10.0, 29.0, 0.5)]}


def test_layout_bits_of_a_tiny_pruned_folder(tiny_dir, tmp_path):
    from sparsezip.compress import compress
    from sparsezip.config import SparsifyConfig
    from sparsezip.report import inspect_folder
    from sparsezip.sparsify import sparsify

    sparse = sparsify(tiny_dir("llama"), tmp_path / "s", SparsifyConfig(method="magnitude", sparsity=0.5,
                                                                        rounding="l2"))
    packed = tmp_path / "c"
    compress(sparse, packed, tp=1, codec_name="nibble-v3")
    _, rows = inspect_folder(packed)  # decodes every linear: an independent count of the same bytes
    linears = [r for r in rows if r.kind == "W16A16SC"]
    assert quality.codec_bits(packed) == pytest.approx(
        8 * sum(r.stored_bytes for r in linears) / sum(r.numel for r in linears))
    # bitmap codes + offsets (~2.25 bits) plus one byte per kept L2-rounded value (~4 bits at 50%), well under fp16
    assert 4 < quality.sparse_layout_bits(sparse) < 10


@pytest.mark.slow
@pytest.mark.skipif(not llamacpp.peer_python().exists(), reason="no .venv-peers (python3 bench/llamacpp.py --setup)")
def test_llamacpp_perplexity_agrees_with_ours_on_the_same_windows(tiny_dir, tmp_path):
    from sparsezip.evaluate import perplexity
    from sparsezip.runtime import load_model

    dense = tiny_dir("llama")
    f16 = llamacpp.export_gguf(dense, tmp_path / "f16.gguf", "f16")
    windows = torch.randint(0, 320, (3, 64), generator=torch.Generator().manual_seed(1))
    theirs = llamacpp.perplexity(f16, windows.tolist(), threads=1)
    ours = perplexity(load_model(dense, weights="dense"), windows, show_progress=False)
    assert theirs["tokens"] == 3 * 63 and len(theirs["window_nll"]) == 3
    assert theirs["ppl"] == pytest.approx(ours, rel=5e-3)
