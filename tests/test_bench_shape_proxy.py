"""bench/shape_proxy.py: the whole model's size from its shapes, the random folder it writes, and its report."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import shape_proxy  # noqa: E402


def test_the_7b_shapes_give_the_7b_parameter_count():
    shape = shape_proxy.SHAPES["deepseek-r1-distill-qwen-7b"]
    # by hand: two 152064 x 3584 tables, the final norm, and 28 layers of q, o (3584^2), k, v (512 x 3584), three
    # MLP matrices (18944 x 3584), the q/k/v biases (3584 + 512 + 512) and two norms (2 x 3584)
    per_layer = 2 * 3584 ** 2 + 2 * 512 * 3584 + 3 * 18944 * 3584 + 3584 + 2 * 512 + 2 * 3584
    params = 2 * 152064 * 3584 + 3584 + 28 * per_layer
    assert params == 7_615_616_512  # the 7.6B of its name
    assert shape_proxy.full_fp16_bytes(shape) == 2 * params
    assert shape_proxy.largest_tensor_bytes(shape) == 2 * 152064 * 3584


@pytest.mark.slow
def test_proxy_writes_a_cut_model_and_reports_each_step_against_its_target(tmp_path, tiny_dir, text_file,
                                                                           monkeypatch, capsys):
    tiny = tiny_dir("qwen2")
    config = json.loads((tiny / "config.json").read_text())
    shape = dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=24,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=config["vocab_size"],
                 tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=10000.0)
    monkeypatch.setitem(shape_proxy.SHAPES, "tiny", shape)
    out = tmp_path / "BENCH.md"
    shape_proxy.main(["--shape", "tiny", "--layers", "2", "--methods", "wanda,sparsegpt", "--tp", "1,2",
                      "--tokenizer", str(tiny), "--calib_text", str(text_file), "--calib_samples", "4",
                      "--calib_seqlen", "32", "--work", str(tmp_path / "work"), "--out", str(out)])
    written = json.loads((tmp_path / "work" / "tiny-2layers-fp16" / "config.json").read_text())
    assert written["num_hidden_layers"] == 2 and written["intermediate_size"] == 128
    table = out.read_text()
    assert "<!-- bench:shape-proxy -->" in table
    rows = re.findall(r"^\| (sparsify \w+ 50%|compress TP \d \(wanda 50%\)) \| \d+ \| \d+ \| ([0-9.]+) \| ([0-9.]+) \| "
                      r"(met|missed) \(([0-9.]+) GiB\) \|$", table, re.M)
    assert [r[0] for r in rows] == ["sparsify wanda 50%", "sparsify sparsegpt 50%", "compress TP 1 (wanda 50%)",
                                    "compress TP 2 (wanda 50%)"]
    full = shape_proxy.full_fp16_bytes(shape)
    for _, peak, ratio, verdict, limit in rows:
        assert float(ratio) == pytest.approx(float(peak) * 2**30 / full, rel=0.02)  # peak printed to 0.01 GiB
        assert verdict == ("met" if float(peak) <= float(limit) else "missed")
    # the tiny model's whole fp16 size is a few MB, far below any process's resident size
    assert rows[0][3] == "missed" and rows[2][3] == "met"
    # only the first method's output (compressed) is kept; the compressed folders are deleted after measuring
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["tiny-2layers-fp16", "wanda50"]
