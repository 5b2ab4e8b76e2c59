"""bench/linears.py: it times every linear of the model once per pass in the layout asked for, its report's rates
and ratios are the arithmetic it claims, and bad cases are one-line errors."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import linears  # noqa: E402


@pytest.fixture(scope="module")
def sparse_tiny(tiny_dir, tmp_path_factory):
    from sparsezip.config import SparsifyConfig
    from sparsezip.sparsify import sparsify

    return sparsify(tiny_dir("llama"), tmp_path_factory.mktemp("linears") / "sparse",
                    SparsifyConfig(method="magnitude", sparsity=0.5))


def decoder_weights(config) -> int:
    """Weights of the decoder layers' linears from the config alone (the head is not a layout module)."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    return config.num_hidden_layers * (h * h + 2 * kv * h + h * h + 3 * h * i)


@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_measure_covers_every_decoder_linear_in_its_layout(sparse_tiny, layout):
    from transformers import AutoConfig

    args = argparse.Namespace(rounds=2, repeats=3, cached_kib=1024, rows=1)
    result = linears.measure(linears.parse_case(f"{sparse_tiny}:{layout}"), args)
    assert result["weights"] == decoder_weights(AutoConfig.from_pretrained(sparse_tiny))
    assert result["seconds"] > 0 and result["cached_s_per_weight"] > 0
    dense_bytes = 2 * result["weights"]
    # the sparse layout holds about 6-11 bits per weight at 50%, the dense one 16
    assert (result["bytes"] < 0.8 * dense_bytes) if layout == "sparse" else (result["bytes"] >= dense_bytes)


def test_rows_reach_every_linear_as_one_batch(sparse_tiny, monkeypatch):
    """--rows 8 times a batch: every linear is called with 8 activation rows, streamed and cached alike."""
    from sparsezip.layouts.base import WeightLayout

    seen = set()
    original = WeightLayout.__call__

    def spy(self, x, *rest, **kwargs):
        seen.add(tuple(x.shape[:-1]))
        return original(self, x, *rest, **kwargs)

    monkeypatch.setattr(WeightLayout, "__call__", spy)
    linears.measure(linears.parse_case(f"{sparse_tiny}:sparse"),
                    argparse.Namespace(rounds=1, repeats=1, cached_kib=1024, rows=8))
    assert seen == {(8,)}
    assert "8 activation row(s) per call, 2 thread(s)" in linears.table(
        [{"case": "a:dense", "weights": 1, "bytes": 1, "seconds": 1.0, "cached_s_per_weight": None}], 1e9, 2, 8)


def test_main_prints_the_table_with_a_probed_bandwidth(sparse_tiny, capsys, monkeypatch):
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", ""))  # main sets it: restored after
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    linears.main([f"{sparse_tiny}:dense", f"{sparse_tiny}:sparse", "--rows", "2", "--rounds", "1", "--repeats", "1",
                  "--probe_mib", "16"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Linears alone, 2 activation row(s) per call, 1 thread(s); read bandwidth probe ")
    probe = float(lines[0].rsplit("probe ", 1)[1].split(" GB/s")[0])
    assert probe > 0.1
    rows = [line for line in lines if line.startswith(f"| {sparse_tiny.name}:")]
    assert len(rows) == 2 and rows[0].endswith("| 1.00x |")


def test_table_rates_and_ratios():
    results = [
        {"case": "a:dense", "weights": 1000, "bytes": 2000, "seconds": 2e-6, "cached_s_per_weight": 1e-12},
        {"case": "b:sparse", "weights": 1000, "bytes": 1000, "seconds": 1e-6, "cached_s_per_weight": None},
    ]
    text = linears.table(results, bandwidth=2e9, threads=1)
    # 2000 bytes in 2 us = 1.0 GB/s, half the 2 GB/s probe; 2 us / 1000 weights = 2000 ps per weight
    assert "| a:dense | 0 | 0.0 | 2000.0 | 1.0 | 1.0 (50%) | 1.00x |" in text
    assert "| b:sparse | 0 | 0.0 | 1000.0 | - | 1.0 (50%) | 2.00x |" in text


@pytest.mark.parametrize("case, message", [
    ("{folder}", "give FOLDER:LAYOUT"),
    ("{folder}:packed", "give FOLDER:LAYOUT"),
    ("{missing}:dense", "is not a model folder"),
])
def test_bad_cases_are_one_line_errors(tmp_path, case, message):
    with pytest.raises(SystemExit) as e:
        linears.parse_case(case.format(folder=tmp_path, missing=tmp_path / "nope"))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_dense_folder_in_the_compressed_layout_is_refused(tiny_dir):
    with pytest.raises(SystemExit) as e:
        linears.measure(linears.parse_case(f"{tiny_dir('llama')}:compressed"),
                        argparse.Namespace(rounds=1, repeats=1, cached_kib=1, rows=1))
    assert str(e.value).startswith("linears: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("option", ["--rows", "--threads", "--probe_mib"])
def test_non_positive_options_are_one_line_errors(tiny_dir, option):
    with pytest.raises(SystemExit) as e:
        linears.main([f"{tiny_dir('llama')}:dense", option, "0"])
    assert str(e.value).startswith("linears: ") and "must be positive" in str(e.value) and "\n" not in str(e.value)
