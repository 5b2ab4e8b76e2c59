"""End to end on the real demo model (SmolLM2-135M-Instruct), with a small calibration set."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from sparsezip.generate import SamplingParams, generate_batch, prompt_ids, stop_ids
from sparsezip.report import format_report, inspect_folder
from sparsezip.runtime import load_model

pytestmark = pytest.mark.slow  # the real demo model end to end

PROMPT = "What's deep learning?"


def test_demo_answers_identically_from_sparse_and_compressed_folders(demo):
    dense, sparse, root = demo
    tokenizer = AutoTokenizer.from_pretrained(root / "c1")
    prompt = prompt_ids(tokenizer, PROMPT)
    stop = stop_ids(tokenizer, root / "c1")
    params = SamplingParams(max_new_tokens=24)
    answers = [generate_batch(load_model(folder), tokenizer, [prompt], params, stop)[0]
               for folder in (sparse, root / "c1")]
    assert answers[0].tokens == answers[1].tokens
    assert len(answers[0].text.split()) >= 5, answers[0].text  # a real sentence, not an immediate stop


def test_demo_tp3_run_from_parts_matches_sparse_folder(demo, sparsezip_cli, sparsezip_ok):
    _, sparse, root = demo
    outputs = []
    for folder in (sparse, root / "c3"):
        result = sparsezip_ok(sparsezip_cli("run", "--model_path", str(folder), "--input_texts", PROMPT,
                                            "--max_output_length", "16", nproc=3))
        outputs.append([line for line in result.stdout.splitlines() if line.startswith(("Answer[0]", "Generate[0] token"))])
    assert len(outputs[0]) == 2 and outputs[0] == outputs[1]


def test_demo_compression_ratio_is_reported(demo):
    _, _, root = demo
    kind, rows = inspect_folder(root / "c3")
    sparse_rows = [r for r in rows if r.kind == "W16A16SC"]
    assert kind == "W16A16SC" and len(sparse_rows) == 3 * 30 * 4  # 3 ranks x 30 layers x 4 fused linears
    weights = sum(r.numel for r in sparse_rows)
    zeros = sum(r.zeros for r in sparse_rows)
    bits = 8 * sum(r.stored_bytes for r in sparse_rows) / weights
    assert abs(zeros / weights - 0.5) < 0.01
    assert 6.8 < bits < 8.1  # nibble-v3 (default): 1 bitmap bit + ~13 bits per kept weight (7.56 at TP 1)
    assert f"{bits:.2f} bits/weight" in format_report(kind, rows, per_tensor=False)
