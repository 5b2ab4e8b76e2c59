"""bench/scale.py: results survive a restart, and the report's arithmetic (gap closed, ratios to fp16) and its
rows for steps that did not run."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import scale  # noqa: E402


def test_results_are_saved_per_step_and_reloaded(tmp_path):
    path = tmp_path / "results.json"
    scale.Results(path).put("dense", {"ppl": 15.5})
    again = scale.Results(path)
    assert "dense" in again and again.get("dense") == {"ppl": 15.5}
    assert again.get("wanda 50%") is None


def test_gap_closed_is_the_share_of_the_baselines_gap_to_dense():
    assert scale.gap_closed(10.0, 20.0, 15.0) == "50%"
    assert scale.gap_closed(10.0, 20.0, 22.0) == "-20%"  # worse than the baseline
    assert scale.gap_closed(10.0, 9.0, 8.0) == "-"  # a baseline better than dense has no gap


def test_report_rows_for_finished_and_missing_steps(tmp_path):
    ns = scale.parse_args(["--tp", "1,2", "--windows", "4"])
    r = scale.Results(tmp_path / "results.json")
    r.put("convert", {"seconds": 90, "peak_gib": 0.5, "fp16_gib": 4.0})
    r.put("dense", {"ppl": 10.0})
    r.put(scale.FP16_RUN, {"answer": "Deep learning is...", "decode_tok_s": 3.0, "peak_gib": 4.4, "loaded_gib": 4.0})
    r.put("sparsegpt 50%", {"ppl": 14.0, "sparsify": {"seconds": 300, "cpu_s": 590, "peak_gib": 2.0}})
    r.put("float_sparse 50%", {"ppl": 12.0, "sparsify": {"seconds": 900, "cpu_s": 1790, "peak_gib": 1.0}})
    text = "\n".join(scale.model_section("m", r, ns))
    assert "| sparsegpt 50% | 14.000 | +40.0% | 300 | 590 | 2.00 | 0.50 |" in text
    assert "float_sparse closes 50% of SparseGPT's gap" in text
    assert "| wanda 2:4 | not run |" in text and "| 2 | not run |" in text
    assert "| dense model, fp16 | 3.00 | 4.00 | 1.00 | 4.40 | 1.10 |" in text
    assert "**dense model, fp16**: Deep learning is..." in text


def test_a_model_that_cannot_be_converted_is_reported_with_its_error(tmp_path):
    ns = scale.parse_args([])
    r = scale.Results(tmp_path / "results.json")
    r.put("blocked", {"error": "convert failed: the GGUF is truncated"})
    assert scale.model_section("big", r, ns)[2] == "Not run: convert failed: the GGUF is truncated"
