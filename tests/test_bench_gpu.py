"""bench/gpu.py and bench/gpu_decode.py without a GPU: the shapes they time, the arithmetic of their reports, the
decode measurement itself (on the CPU), and one-line exits where no GPU is."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import gpu  # noqa: E402
import gpu_decode  # noqa: E402


def test_square_matrices_come_before_the_tp_shapes():
    pairs = gpu.linears(gpu.parse_args(["--square", "4096", "1024", "--tp", "2"]))
    shapes = [(tp, lin.n, lin.k) for tp, lin in pairs]
    # Qwen3-32B at TP 2: qkv (64 + 2 * 8) * 128 / 2 rows, o_proj 64 * 128 / 2 columns, MLP 25600 split in two
    assert shapes == [("-", 4096, 4096), ("-", 1024, 1024), (2, 5120, 5120), (2, 5120, 4096), (2, 25600, 5120),
                      (2, 5120, 12800)]
    assert [lin.name for _, lin in gpu.linears(gpu.parse_args(["--square", "--tp", "1"]))] == [
        "qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def fake_result(decode1: float, decode8: float, tokens: list[int]) -> dict:
    return {"decode1": decode1, "decode8": decode8, "tokens": tokens, "weights_mib": 1.0, "step_bytes": 944,
            "kv_element": 2}


def test_decode_report_limits_ratios_and_token_check():
    args = argparse.Namespace(prompt_len=4, new_tokens=4, layers=1, repeats=1)
    # a step reads 944 weight bytes + one 4-wide fp16 embedding row (8) + the KV cache at mid-decode:
    # 2 (K and V) * 1 layer * 1 head * 2 dims * 6 positions * 2 bytes = 48; 1000 bytes at 1e6 B/s = 1000 tok/s
    shape = {"layers": 1, "kv_heads": 1, "head_dim": 2, "hidden": 4}
    results = {gpu_decode.DENSE: fake_result(400.0, 800.0, [1, 2, 3]),
               gpu_decode.PRUNED: fake_result(400.0, 800.0, [1, 2, 4]),
               "compressed a": fake_result(260.0, 200.0, [1, 2, 4]),
               "compressed b": fake_result(100.0, 1600.0, [1, 2, 3])}
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")
            for line in gpu_decode.report(results, shape, 1e6, args, "card").splitlines() if line.startswith("| ")}
    assert rows[gpu_decode.DENSE][4:6] == ["40.0%", "1.00x"]
    assert rows["compressed a"][3:8] == ["260.0", "26.0%", "0.65x", "200.0", "0.25x"]
    assert rows["compressed a"][8].strip(" |") == "yes"  # the same tokens as cuBLAS on the same pruned weights
    assert rows["compressed b"][4:8] == ["10.0%", "0.25x", "1600.0", "2.00x"]
    assert rows["compressed b"][8].strip(" |") == "no"


@pytest.mark.parametrize("profile", [False, True])
def test_decode_measurement_runs_the_model(tiny_dir, profile):
    args = argparse.Namespace(prompt_len=8, new_tokens=5, repeats=1, profile=profile)
    r = gpu_decode.measure(tiny_dir("llama"), "dense", args, device="cpu")
    assert r["decode1"] > 0 and r["decode8"] > 0
    assert len(r["tokens"]) == args.new_tokens
    assert r["step_bytes"] >= r["weights_mib"] * 2**20 * 0.5  # every linear and the head are read each step
    assert ("aten::" in r["profile"]) if profile else "profile" not in r


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_gpu_benchmarks_exit_with_one_line_without_a_gpu(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_decode.main(["--tokenizer", str(tmp_path)])
    assert "needs a CUDA GPU" in str(exit_info.value) and "\n" not in str(exit_info.value)
    with pytest.raises(SystemExit) as exit_info:
        gpu.main(["--sweep", "2"])
    assert "needs a CUDA GPU" in str(exit_info.value)


def test_decode_preparation_needs_a_tokenizer(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        gpu_decode.main(["--tokenizer", str(tmp_path), "--prepare_only", "--work", str(tmp_path / "work")])
    assert "has no tokenizer.json" in str(exit_info.value)
    assert not (tmp_path / "work").exists()  # nothing was started


@pytest.mark.parametrize("argv", [["--layers", "0"], ["--new_tokens", "1"], ["--repeats", "0"]])
def test_decode_rejects_bad_arguments(argv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_decode.parse_args(["--tokenizer", str(tmp_path), *argv])
    assert exit_info.value.code == 2
    assert "must be" in capsys.readouterr().err


def test_tables_are_printed_and_written_into_their_section(tmp_path, capsys):
    from measure import print_and_write

    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# notes\n", encoding="utf-8")
    print_and_write("| a |\n", out, gpu_decode.SECTION)
    print_and_write("| b |\n", None, gpu_decode.SECTION)  # printed only
    assert out.read_text(encoding="utf-8") == "# notes\n\n<!-- bench:gpu-decode -->\n| a |\n<!-- /bench:gpu-decode -->\n"
    printed = capsys.readouterr()
    assert "| a |" in printed.out and "| b |" in printed.out and "wrote section" in printed.err
