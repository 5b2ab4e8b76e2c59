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
    r.put("float_sparse 50%, tuned", {"ppl": 11.0, "sparsify": {"seconds": 950, "cpu_s": 1890, "peak_gib": 1.1}})
    text = "\n".join(scale.model_section("m", r, ns))
    assert "| sparsegpt 50% | 14.000 | +40.0% | 300 | 590 | 2.00 | 0.50 |" in text
    assert "- 50%: float_sparse 12.000 against SparseGPT 14.000; it closes 50% of SparseGPT's gap" in text
    assert ("- 50%: float_sparse `--admm_rho 0.6 --mask_scope row --admm_damp auto --mask_score obs` 11.000 against "
            "SparseGPT 14.000; it closes 75% of SparseGPT's gap") in text
    assert "| float_sparse 2:4, tuned | not run |" in text and "2:4: float_sparse" not in text
    assert "| wanda 2:4 | not run |" in text and "| 2 | not run |" in text
    assert "| dense model, fp16 | 3.00 | 4.00 | 1.00 | 4.40 | 1.10 |" in text
    assert "**dense model, fp16**: Deep learning is..." in text


def test_every_config_is_a_valid_sparsify_command(tmp_path, monkeypatch, tiny_dir):
    """Each CONFIGS row's flags pass sparsify's own parser and settings checks (on a tiny model's shapes)."""
    from sparsezip.cli import build_parser, sparsify_config
    from sparsezip.config import ModelArgs

    args = ModelArgs.from_dir(tiny_dir())

    commands = []
    monkeypatch.setattr(scale, "measured", lambda step, cmd: commands.append(cmd) or ("", {}))
    ns = scale.parse_args([])
    for config in scale.CONFIGS:
        scale.sparsify(tmp_path / "dense", config, ns, tmp_path)
    assert len(commands) == len(scale.CONFIGS)
    for cmd in commands:
        argv = cmd[cmd.index("sparsify"):]
        config = sparsify_config(build_parser().parse_args(argv)).checked(args)  # raises on a refused setting
        assert config.method in ("wanda", "sparsegpt", "float_sparse")
    tuned = [c for c in commands if "--admm_damp" in c]
    assert len(tuned) == 2 and all(c[c.index("--admm_damp") + 1] == "auto" for c in tuned)


def test_a_model_that_cannot_be_converted_is_reported_with_its_error(tmp_path):
    ns = scale.parse_args([])
    r = scale.Results(tmp_path / "results.json")
    r.put("blocked", {"error": "convert failed: the GGUF is truncated"})
    assert scale.model_section("big", r, ns)[2] == "Not run: convert failed: the GGUF is truncated"
