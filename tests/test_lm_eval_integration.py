"""lm-evaluation-harness scores sparsezip folders through our registered LM, as its own `hf` model does."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from conftest import REPO
from sparsezip.compress import compress
from sparsezip.config import SparsifyConfig
from sparsezip.integrations.lm_eval_model import SparsezipLM
from sparsezip.sparsify import sparsify

TASKS = ["sparsezip_mc", "sparsezip_rolling", "sparsezip_gen"]


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the task files name their data relative to the repository
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def evaluate(model, tasks, model_args=None):
    results = simple_evaluate(model=model, model_args=model_args, tasks=tasks, batch_size=1, device="cpu",
                              task_manager=TaskManager(include_path=str(REPO / "tests" / "lm_eval_tasks")),
                              log_samples=True)
    return results["results"], results["samples"]


def assert_same_scores(ours: dict, theirs: dict) -> None:
    assert ours["sparsezip_mc"]["acc,none"] == theirs["sparsezip_mc"]["acc,none"]
    assert ours["sparsezip_mc"]["acc_norm,none"] == theirs["sparsezip_mc"]["acc_norm,none"]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert math.isclose(ours["sparsezip_rolling"][metric], theirs["sparsezip_rolling"][metric], rel_tol=1e-4)
    assert ours["sparsezip_gen"]["exact_match,none"] == theirs["sparsezip_gen"]["exact_match,none"]


def generations(samples: dict) -> list[str]:
    return [s["resps"][0][0] for s in samples["sparsezip_gen"]]


def test_dense_folder_scores_what_the_harness_hf_model_scores(tiny_dir, in_repo):
    folder = tiny_dir("qwen2")
    theirs, their_samples = evaluate("hf", TASKS, f"pretrained={folder},dtype=float32")
    ours, our_samples = evaluate(SparsezipLM(pretrained=str(folder), weights="dense"), TASKS)
    assert_same_scores(ours, theirs)
    assert generations(our_samples) == generations(their_samples)
    loglikelihoods = lambda s: [float(r[0][0]) for r in s["resps"]]  # noqa: E731
    for ours_doc, theirs_doc in zip(our_samples["sparsezip_mc"], their_samples["sparsezip_mc"]):
        assert [round(x, 3) for x in loglikelihoods(ours_doc)] == [round(x, 3) for x in loglikelihoods(theirs_doc)]


@pytest.mark.slow
def test_compressed_folder_scores_like_its_sparse_source_in_every_layout(tiny_dir, text_file, tmp_path, in_repo):
    sparse = sparsify(tiny_dir("llama"), tmp_path / "s", SparsifyConfig(method="wanda", sparsity=0.5,
                                                                      calib=[text_file], calib_samples=4,
                                                                      calib_seqlen=32))
    compressed = compress(sparse, tmp_path / "c", tp=1) and tmp_path / "c"
    reference, _ = evaluate(SparsezipLM(pretrained=str(sparse), weights="dense"), TASKS)
    for weights in ("sparse", "compressed"):
        ours, _ = evaluate(SparsezipLM(pretrained=str(compressed), weights=weights), TASKS)
        assert_same_scores(ours, reference)
    theirs, _ = evaluate("hf", TASKS, f"pretrained={sparse},dtype=float32")  # transformers reads W16A16S, too
    assert_same_scores(reference, theirs)


@pytest.mark.slow
def test_lm_eval_command_line_runs_our_model(tiny_dir, tmp_path, in_repo):
    out = tmp_path / "out"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "sparsezip.integrations.lm_eval_model", "--model", "sparsezip",
                             "--model_args", f"pretrained={tiny_dir('llama')},weights=dense", "--tasks",
                             "sparsezip_mc", "--include_path", str(REPO / "tests" / "lm_eval_tasks"),
                             "--output_path", str(out)], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads(next(out.rglob("results_*.json")).read_text())
    assert 0.0 <= written["results"]["sparsezip_mc"]["acc,none"] <= 1.0
    assert "sparsezip_mc" in result.stdout


@pytest.mark.slow
def test_lm_eval_command_line_reports_a_bad_folder_in_one_line(tmp_path, in_repo):
    result = subprocess.run([sys.executable, "-m", "sparsezip.integrations.lm_eval_model", "--model", "sparsezip",
                             "--model_args", f"pretrained={tmp_path / 'missing'}", "--tasks", "sparsezip_mc",
                             "--include_path", str(REPO / "tests" / "lm_eval_tasks")],
                            capture_output=True, text=True, env=dict(os.environ, HF_DATASETS_OFFLINE="1"), cwd=REPO)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"error: model path {tmp_path / 'missing'} does not exist"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, expected", [
    (dict(weigths="dense"), "unknown model_args weigths; sparsezip takes pretrained"),
    (dict(dtype="bogus"), "unknown model_args dtype"),
    (dict(pretrained=None), "model_args needs pretrained=FOLDER"),
    (dict(max_length=-5), "max_length must be a whole number from 2 to 256, got -5"),
    (dict(max_length=0), "max_length must be a whole number from 2 to 256, got 0"),
    (dict(max_length=1000), "got 1000"),
    (dict(max_length="abc"), "got 'abc'"),
    (dict(batch_size=0), "batch_size must be a whole number at least 1, got 0"),
    (dict(batch_size="abc"), "got 'abc'"),
    (dict(max_gen_toks=0), "max_gen_toks must be a whole number at least 1"),
], ids=lambda v: v if isinstance(v, str) else ",".join(f"{k}={v}" for k, v in v.items()))
def test_bad_model_args_are_refused_before_the_model_loads(args, expected, tiny_dir):
    """A typo or a value out of range had been swallowed (a negative max_length silently changed the scores)."""
    from sparsezip.errors import SparsezipError

    with pytest.raises(SparsezipError, match=expected):
        SparsezipLM(**({"pretrained": str(tiny_dir("llama"))} | args))


def test_a_continuation_that_cannot_be_scored_is_one_clear_error(tiny_dir):
    from sparsezip.errors import SparsezipError

    lm = SparsezipLM(pretrained=str(tiny_dir("llama")), weights="dense", batch_size="auto", max_batch_size=8)
    assert lm.score([1, 2], [3])[0] < 0  # the harness's own arguments are taken
    with pytest.raises(SparsezipError, match="empty continuation"):
        lm.score([1, 2], [])
    with pytest.raises(SparsezipError, match="continuation of 300 tokens is longer than max_length 256"):
        lm.score([1], [5] * 300)
