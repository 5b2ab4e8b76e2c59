"""evaluate.window_losses against a float64 log-softmax, and bench/gap_closed.py: the share of a gap closed, its
paired bootstrap interval and the report on tiny folders."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from sparsezip.data import auto_tokenizer, eval_windows
from sparsezip.evaluate import perplexity, window_losses
from sparsezip.runtime import load_model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import gap_closed  # noqa: E402


def test_window_losses_are_each_windows_mean_log_loss(tiny_dir, text_file):
    folder = tiny_dir("llama")
    model = load_model(folder, weights="dense")
    windows = eval_windows(auto_tokenizer(folder), [text_file], 24, 5)
    with torch.no_grad():
        logp = model(windows).double().log_softmax(-1)
    want = -logp[:, :-1].gather(-1, windows[:, 1:, None]).squeeze(-1).mean(1)
    for batch_size in (1, 2, 5):
        got = window_losses(model, windows, batch_size, show_progress=False)
        assert got.dtype == torch.float64 and got.shape == (5,)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    assert perplexity(model, windows, show_progress=False) == pytest.approx(math.exp(float(want.mean())), rel=1e-5)


def test_gap_closed_is_the_share_of_the_perplexity_gap():
    dense, base, cand = (torch.full((6,), math.log(p), dtype=torch.float64) for p in (10.0, 20.0, 15.0))
    assert float(gap_closed.gap_closed(dense, base, cand)) == pytest.approx(0.5)
    assert float(gap_closed.gap_closed(dense, base, base)) == pytest.approx(0.0)
    low, high = gap_closed.bootstrap_interval(dense, base, cand, 500)
    assert low == pytest.approx(0.5) and high == pytest.approx(0.5)


def test_bootstrap_pairs_the_windows():
    # windows differ a lot in difficulty, the same for every folder; the folders' offsets are fixed. Paired
    # resamples keep the share near its value; resampling each folder on its own would spread it over +-100%.
    g = torch.Generator().manual_seed(0)
    hardness = torch.randn(40, generator=g, dtype=torch.float64)
    dense, base, cand = hardness + 2.0, hardness + 2.2, hardness + 2.1
    share = float(gap_closed.gap_closed(dense, base, cand))
    low, high = gap_closed.bootstrap_interval(dense, base, cand, 2000)
    assert low <= share <= high and high - low < 0.05
    noisy = cand + 0.05 * torch.randn(40, generator=g, dtype=torch.float64)
    low2, high2 = gap_closed.bootstrap_interval(dense, base, noisy, 2000)
    assert high2 - low2 > 2 * (high - low)  # noise of the candidate's own widens it


def test_report_scores_every_folder_on_the_same_windows(tiny_dir, text_file, tmp_path, capsys):
    folders = [tiny_dir("llama", seed=s) for s in (0, 1, 2)]
    out = tmp_path / "losses.json"
    gap_closed.main(["--dense", str(folders[0]), "--baseline", str(folders[1]), "--candidates", str(folders[2]),
                     "--data", str(text_file), "--seqlen", "24", "--max_windows", "10", "--resamples", "200",
                     "--json", str(out)])
    table = capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["losses.json"]  # no temporary file left
    saved = json.loads(out.read_text())["losses"]
    for folder in folders:
        windows = eval_windows(auto_tokenizer(folder), [text_file], 24, 10)
        ppl = perplexity(load_model(folder, weights="dense"), windows, show_progress=False)
        assert re.search(rf"\| {re.escape(str(folder))} \| {ppl:.3f} \|", table)
        assert len(saved[str(folder)]) == 10
    ppl = [math.exp(sum(saved[str(f)]) / 10) for f in folders]
    share = (ppl[1] - ppl[2]) / (ppl[1] - ppl[0])
    assert re.search(rf"\| {re.escape(str(folders[2]))} \| {share:.1%} \| ", table)


def test_reuse_takes_the_losses_of_folders_scored_on_the_same_windows(tiny_dir, text_file, tmp_path, capsys,
                                                                       monkeypatch):
    folders = [str(tiny_dir("llama", seed=s)) for s in (0, 1, 2, 3)]
    first = tmp_path / "first.json"
    common = ["--data", str(text_file), "--seqlen", "24", "--resamples", "200"]
    gap_closed.main(["--dense", folders[0], "--baseline", folders[1], "--candidates", folders[2], "--max_windows",
                     "10", "--json", str(first), *common])
    whole = capsys.readouterr().out
    scored = []
    real = gap_closed.folder_losses
    monkeypatch.setattr(gap_closed, "folder_losses", lambda folder, *a: scored.append(str(folder)) or real(folder, *a))
    gap_closed.main(["--dense", folders[0], "--baseline", folders[1], "--candidates", folders[2], folders[3],
                     "--max_windows", "10", "--reuse", str(first), *common])
    assert scored == [folders[3]]
    again = capsys.readouterr().out
    assert whole.splitlines()[2:5] == again.splitlines()[2:5]  # the three folders' perplexities, as scored
    scored.clear()  # fewer windows: the first 6 of the saved 10; other settings: nothing reused
    gap_closed.main(["--dense", folders[0], "--baseline", folders[1], "--candidates", folders[2],
                     "--max_windows", "6", "--reuse", str(first), *common])
    assert scored == []
    gap_closed.main(["--dense", folders[0], "--baseline", folders[1], "--candidates", folders[2],
                     "--max_windows", "12", "--reuse", str(first), *common])
    assert scored == folders[:3]
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(SystemExit, match="--reuse .*bad.json: not a --json file of this script"):
        gap_closed.main(["--dense", folders[0], "--baseline", folders[1], "--candidates", folders[2],
                         "--reuse", str(tmp_path / "bad.json"), *common])


def test_refuses_a_folder_named_twice_a_non_model_or_missing_text(tiny_dir, text_file, tmp_path):
    dense = str(tiny_dir("llama"))
    with pytest.raises(SystemExit, match="named once"):
        gap_closed.main(["--dense", dense, "--baseline", dense, "--candidates", dense, "--data", str(text_file)])
    with pytest.raises(SystemExit, match="not a model folder"):
        gap_closed.main(["--dense", dense, "--baseline", str(tmp_path), "--candidates", dense + "x",
                         "--data", str(text_file)])
    for flag, value in (("--max_windows", "0"), ("--seqlen", "1"), ("--batch_size", "0")):
        with pytest.raises(SystemExit, match=f"gap_closed: {flag}"):
            gap_closed.main(["--dense", dense, "--baseline", str(tiny_dir("llama", seed=1)), "--candidates",
                             str(tiny_dir("llama", seed=2)), "--data", str(text_file), "--seqlen", "24",
                             flag, value])
    with pytest.raises(SystemExit, match="missing.txt: no such text file"):
        gap_closed.main(["--dense", dense, "--baseline", str(tiny_dir("llama", seed=1)), "--candidates",
                         str(tiny_dir("llama", seed=2)), "--data", str(tmp_path / "missing.txt")])


def test_a_damaged_folder_is_a_one_line_error(tiny_dir, text_file, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir("llama"), broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SystemExit, match=rf"gap_closed: {re.escape(str(broken))}: "):
        gap_closed.main(["--dense", str(tiny_dir("llama")), "--baseline", str(broken), "--candidates",
                         str(tiny_dir("llama", seed=1)), "--data", str(text_file), "--seqlen", "24"])
