"""bench/run.py's report: every row's bandwidth limit comes from the probes taken around that row's own run, and
the table prints the arithmetic it claims (no model runs here: the measurements are given)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import run  # noqa: E402

SHAPE = {"layers": 2, "kv_heads": 1, "head_dim": 4, "hidden": 8, "tied": True}
ARGS = argparse.Namespace(prompt_len=10, new_tokens=4, models=["demo"], threads=[2])


def row(decode1: float, bandwidth: float, probes: list[float]) -> dict:
    return {"prefill": 50.0, "decode1": decode1, "decode8": 8 * decode1, "resident_mib": 10.0, "weights_mib": 9.0,
            "step_bytes": 1_000_000, "kv_element": 4, "bandwidth": bandwidth, "probes": probes}


def test_a_row_is_measured_between_two_probes_and_keeps_the_higher(monkeypatch):
    calls = []
    probes = iter([30e9, 50e9])

    def fake_probe(buffer, threads):
        calls.append(("probe", threads))
        return next(probes)

    def fake_measure(engine, folders, threads, args, tied):
        calls.append(("measure", threads))
        return {"decode1": 7.0}

    monkeypatch.setattr(run, "read_bandwidth", fake_probe)
    monkeypatch.setattr(run, "measure", fake_measure)
    result = run.measure_between_probes(run.ENGINES[0], {}, 2, ARGS, True, buffer=None)
    assert calls == [("probe", 2), ("measure", 2), ("probe", 2)]
    assert result == {"decode1": 7.0, "bandwidth": 50e9, "probes": [30e9, 50e9]}


def test_each_row_divides_by_its_own_bandwidth():
    rows = {(run.BASELINE, 2): row(10.0, 40e9, [40e9, 38e9]), ("sparse", 2): row(10.0, 20e9, [20e9, 19e9])}
    lines = run.model_table("m", rows, SHAPE, ARGS)
    kv = run.kv_bytes(2, 1, 4, 10 + 2, 4)
    per_step = 1_000_000 + 8 * 2 + kv
    dense_line = next(line for line in lines if line.startswith(f"| {run.BASELINE} |"))
    sparse_line = next(line for line in lines if line.startswith("| sparse |"))
    # same speed, half the bandwidth: twice the share of the limit
    assert "| 40.0 |" in dense_line and f"10.0 ({100 * 10.0 / (40e9 / per_step):.0f}%)" in dense_line
    assert "| 20.0 |" in sparse_line and f"10.0 ({100 * 10.0 / (20e9 / per_step):.0f}%)" in sparse_line
    assert "| 1.00x |" in sparse_line  # the ratio to dense is untouched by the probes


def test_the_header_gives_each_thread_counts_probe_range():
    rows = {(run.BASELINE, 1): row(5.0, 30e9, [29e9, 30e9]), (run.BASELINE, 2): row(9.0, 60e9, [36e9, 60e9]),
            ("sparse", 2): row(8.0, 41e9, [41e9, 40e9])}
    assert run.probe_ranges({"m": rows}) == "29.0-30.0 GB/s at 1 thread, 36.0-60.0 GB/s at 2 threads"
