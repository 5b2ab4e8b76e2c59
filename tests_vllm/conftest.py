"""Folders for the vLLM plugin's tests, made once per session from the offline demo model (SmolLM2-135M)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsezip.formats import QUANT_METHOD, FolderKind, quantization_entry

PROMPT = "What's deep learning?"
MAX_TOKENS = 16
# A folder to make the test folders in and reuse on later runs (the sparsify step takes minutes on 2 cores);
# a fresh temporary folder when unset.
KEEP_FOLDERS = "SPARSEZIP_VLLM_TEST_DIR"


def sparsezip_cli(*args: str) -> str:
    """Runs `sparsezip ARGS` with this interpreter (the vLLM venv's own sparsezip); its stdout."""
    done = subprocess.run([sys.executable, "-m", "sparsezip", *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"sparsezip {' '.join(args)} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def demo_path(what: str) -> Path:
    done = subprocess.run([sys.executable, "-m", "sparsezip_demo", "-q", what], capture_output=True, text=True,
                          timeout=900, check=True)
    return Path(done.stdout.strip().splitlines()[-1])


def mark_quantized(folder: Path, kind: FolderKind, tp_size: int = 1) -> None:
    """The config.json entry vLLM reads the quantization method from; newer sparsezip writes it itself."""
    config = json.loads((folder / "config.json").read_text())
    if config.get("quantization_config", {}).get("quant_method") == QUANT_METHOD:
        return
    config["quantization_config"] = quantization_entry(kind, tp_size)
    (folder / "config.json").write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="session")
def folders(tmp_path_factory) -> dict[str, Path]:
    """{"S": the W16A16S folder, "SC1" / "SC3": it compressed into 1 and 3 parts}. Not 2: the demo model's 9
    attention heads and 3 KV heads split only into 1 or 3 (for vLLM as for sparsezip)."""
    kept = os.environ.get(KEEP_FOLDERS)
    root = Path(kept) if kept else tmp_path_factory.mktemp("vllm")
    sparse = root / "w16a16s"
    if not sparse.is_dir():  # sparsezip writes folders atomically: one that exists is complete
        make_sparse(sparse)
    mark_quantized(sparse, FolderKind.W16A16S)
    made = {"S": sparse}
    for tp in (1, 3):
        compressed = root / f"w16a16sc-tp{tp}"
        if not compressed.is_dir():
            sparsezip_cli("compress", "--model_path", str(sparse), "--save_directory", str(compressed), "--tp", str(tp))
        mark_quantized(compressed, FolderKind.W16A16SC, tp)
        made[f"SC{tp}"] = compressed
    return made


def make_sparse(sparse: Path) -> None:
    model, austen = demo_path("model"), demo_path("austen")
    sparsezip_cli("sparsify", "--model_path", str(model), "--save_path", str(sparse), "--method", "float_sparse",
                  "--sparsity", "0.5", "--calib", str(austen / "emma.txt"), "--calib_samples", "4",
                  "--calib_seqlen", "128")


@pytest.fixture(scope="session")
def reference(folders) -> dict:
    """What `sparsezip run --model_path <W16A16S> --input_texts PROMPT --max_output_length 16` generates, as ids:
    the prompt's ids (chat template included), the new tokens, and the ids that end a generation."""
    import torch

    from sparsezip import layouts
    from sparsezip.data import auto_tokenizer
    from sparsezip.generate import SamplingParams, generate_batch, prompt_ids, stop_ids
    from sparsezip.runtime import load_model

    folder = folders["S"]
    tokenizer = auto_tokenizer(folder)
    prompt = prompt_ids(tokenizer, PROMPT)
    eos = stop_ids(tokenizer, folder)
    runs = {}
    for name in ("S", "SC1"):  # the runtime gives every folder kind of the same weights the same tokens
        model = load_model(folders[name], device="cpu", dtype=torch.float32, weights=layouts.AUTO)
        runs[name] = generate_batch(model, tokenizer, [prompt], SamplingParams(max_new_tokens=MAX_TOKENS), eos)[0]
    assert runs["S"].tokens == runs["SC1"].tokens
    return {"prompt": prompt, "tokens": runs["S"].tokens, "eos": eos}
