"""Token streams for calibration and evaluation, from .txt and .jsonl files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from .errors import SparsezipError

JSONL_KEYS = ("text", "inputs_pretokenized")  # the original calibration set uses the latter


def read_jsonl(path: Path) -> list[str]:
    texts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise SparsezipError(f"{path}:{n} is not valid JSON") from None
        text = next((record[k] for k in JSONL_KEYS if isinstance(record, dict) and k in record), None)
        if not isinstance(text, str):
            raise SparsezipError(f"{path}:{n} has no string field {' or '.join(JSONL_KEYS)}")
        texts.append(text)
    return texts


def read_text_file(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise SparsezipError(f"data file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SparsezipError(f"{path} is not UTF-8 text") from None


def tokenize(tokenizer, text: str) -> torch.Tensor:
    # verbose=False: long books exceed the tokenizer's model_max_length, which is harmless here
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


def calibration_samples(tokenizer, files: list[Path], n_samples: int = 32, seqlen: int = 512,
                        seed: int = 0) -> list[torch.Tensor]:
    """Calibration token sequences [L] each.

    .txt files are joined with blank lines and `n_samples` windows of `seqlen` tokens are drawn
    with `random.Random(seed).randint` (the reference protocol); every .jsonl record is one sample,
    cut to `seqlen`, like the original's calibration set.
    """
    files = [Path(f) for f in files]
    txt = [f for f in files if f.suffix != ".jsonl"]
    samples = []
    for f in files:
        if f.suffix == ".jsonl":
            if not f.is_file():
                raise SparsezipError(f"data file {f} does not exist")
            samples += [tokenize(tokenizer, t)[:seqlen] for t in read_jsonl(f)]
    if txt:
        ids = tokenize(tokenizer, "\n\n".join(read_text_file(f) for f in txt))
        if len(ids) <= seqlen + 1:
            raise SparsezipError(f"calibration text has {len(ids)} tokens, fewer than --calib_seqlen {seqlen}")
        rng = random.Random(seed)
        for _ in range(n_samples):
            i = rng.randint(0, len(ids) - seqlen - 1)
            samples.append(ids[i:i + seqlen])
    samples = [s for s in samples if len(s) > 1]
    if not samples:
        raise SparsezipError("no calibration samples: give --calib files with text in them")
    return samples


def eval_windows(tokenizer, files: list[Path], seqlen: int = 1024, max_windows: int | None = None) -> torch.Tensor:
    """The first non-overlapping `seqlen`-token windows [K, seqlen] of the joined files."""
    ids = tokenize(tokenizer, "\n\n".join(read_text_file(f) for f in files))
    k = len(ids) // seqlen
    if max_windows is not None:
        k = min(k, max_windows)
    if k == 0:
        raise SparsezipError(f"the evaluation text has {len(ids)} tokens, fewer than one window of {seqlen}")
    return ids[: k * seqlen].view(k, seqlen)
