"""Token streams for calibration and evaluation, from .txt and .jsonl files."""

from __future__ import annotations

import json
import logging
import os
import random
import re
from pathlib import Path

import torch
from tokenizers import Encoding, Tokenizer, models, pre_tokenizers

from .errors import SparsezipError

log = logging.getLogger("sparsezip")

JSONL_KEYS = ("text", "inputs_pretokenized")  # the original calibration set uses the latter
# tokenizer_config.json classes that transformers builds straight from tokenizer.json, unchanged
PLAIN_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token",
                      "additional_special_tokens", "extra_special_tokens")
# tokenizer_config.json keys that do not change how transformers turns text into ids (decoding, padding, chat,
# bookkeeping, and the special tokens, which are checked separately); any other key sends us to transformers
NEUTRAL_CONFIG_KEYS = {"backend", "tokenizer_class", "is_local", "local_files_only", "model_max_length",
                       "name_or_path", "clean_up_tokenization_spaces", "padding_side", "truncation_side",
                       "model_input_names", "chat_template", "errors", "processor_class",
                       "spaces_between_special_tokens", *SPECIAL_TOKEN_KEYS}
# Where a long text may be cut into pieces that a ByteLevel BPE tokenizer encodes exactly as the whole text: after
# a single newline that follows a non-space and precedes an ASCII letter, the GPT-2 pre-tokenizer regex always
# ends one pre-token at the newline and starts the next at the letter, and BPE never merges across pre-tokens.
SAFE_CUT = re.compile(r"(?<=\S\n)(?=[A-Za-z])")
PIECES_PER_THREAD = 4  # several pieces per thread even out the threads' work
# Calibration text with fewer distinct tokens (digits only, one repeated word) cannot stand for the inputs a model
# sees; pruning on it runs for minutes and gives a broken model, so it is refused at once.
MIN_DISTINCT_CALIBRATION_TOKENS = 32


def read_jsonl(path: Path) -> list[str]:
    texts = []
    for n, line in enumerate(read_text_file(path).splitlines(), 1):
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


def check_text_file(path: Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise SparsezipError(f"data file {path} is a folder; pass the text files in it")
    if not path.is_file():
        raise SparsezipError(f"data file {path} does not exist")
    return path


def read_text_file(path: Path) -> str:
    path = check_text_file(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SparsezipError(f"{path} is not UTF-8 text (byte {e.start}); convert it, e.g. with iconv") from None
    if "\0" in text:  # valid UTF-8 can still be a binary file; no text holds NUL characters
        raise SparsezipError(f"{path} holds NUL characters: a binary file, not text")
    return text


def load_tokenizer(model_dir: Path):
    """The tokenizer for calibration text: a `tokenizers.Tokenizer` read from tokenizer.json when that gives exactly
    the ids of transformers' AutoTokenizer (importing transformers alone costs seconds), else AutoTokenizer itself."""
    try:
        tokenizer = plain_tokenizer(Path(model_dir))
    except Exception as e:  # noqa: BLE001 - json and tokenizers raise many kinds on a damaged file
        raise SparsezipError(f"{model_dir}: the tokenizer files cannot be read ({' '.join(str(e).split())})") from None
    return tokenizer if tokenizer is not None else auto_tokenizer(model_dir)


def auto_tokenizer(model_dir: Path):
    """transformers' AutoTokenizer for a local folder (never remote code), a damaged file as a one-line error."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds on missing or damaged files
        raise SparsezipError(f"{model_dir}: the tokenizer files cannot be read ({' '.join(str(e).split())})") from None


def plain_tokenizer(model_dir: Path) -> Tokenizer | None:
    """tokenizer.json as is, or None when transformers would change it: a tokenizer class of its own, a config key
    that alters encoding (add_bos_token, add_prefix_space, ...), or a special token missing from the file (which
    transformers would add)."""
    json_path, config_path = model_dir / "tokenizer.json", model_dir / "tokenizer_config.json"
    if not (json_path.is_file() and config_path.is_file()):
        return None
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") not in PLAIN_TOKENIZER_CLASSES or set(config) - NEUTRAL_CONFIG_KEYS:
        return None
    tokenizer = Tokenizer.from_file(str(json_path))
    in_file = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    named = [v for k in SPECIAL_TOKEN_KEYS for v in as_list(config.get(k))]
    if not all(isinstance(v, str) and v in in_file for v in named):
        return None
    tokenizer.no_truncation()  # as transformers encodes by default
    tokenizer.no_padding()
    return tokenizer


def as_list(value) -> list:
    """A config's special token entry as a list of token strings: None, "tok", {"content": "tok"} or a list of them."""
    values = value if isinstance(value, list) else [] if value is None else [value]
    return [v.get("content") if isinstance(v, dict) else v for v in values]


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids [T] of `text`, special tokens included, from a transformers tokenizer or a plain one."""
    if isinstance(tokenizer, Tokenizer):
        return torch.tensor(encode_long(tokenizer, text), dtype=torch.long)
    # verbose=False: long books exceed the tokenizer's model_max_length, which is harmless here
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


def encode_long(tokenizer: Tokenizer, text: str) -> list[int]:
    """tokenizer.encode(text).ids, with the text encoded in pieces on all threads when cutting it cannot change
    the ids (a byte-level BPE tokenizer, see SAFE_CUT); the special tokens are added once, around the whole."""
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    pieces = cut(text, threads * PIECES_PER_THREAD) if cuts_safely(tokenizer) else [text]
    if len(pieces) == 1:
        return tokenizer.encode(text).ids
    # the _fast variant skips the character offsets, which nothing here reads: ~40% less time
    encodings = tokenizer.encode_batch_fast(pieces, add_special_tokens=False)
    return tokenizer.post_process(Encoding.merge(encodings, growing_offsets=True)).ids


def cuts_safely(tokenizer: Tokenizer) -> bool:
    """True for the configuration SAFE_CUT was reasoned for: no normalizer, the GPT-2 ByteLevel pre-tokenizer
    without prefix space, deterministic BPE, and no added token that could match across a cut."""
    pre = tokenizer.pre_tokenizer
    return (tokenizer.normalizer is None and isinstance(pre, pre_tokenizers.ByteLevel) and pre.use_regex
            and not pre.add_prefix_space and isinstance(tokenizer.model, models.BPE) and not tokenizer.model.dropout
            and not any(t.lstrip or "\n" in t.content for t in tokenizer.get_added_tokens_decoder().values()))


def cut(text: str, pieces: int) -> list[str]:
    """`text` in up to `pieces` parts of similar length, cut only at SAFE_CUT positions."""
    starts = [0]
    for k in range(1, pieces):
        found = SAFE_CUT.search(text, max(starts[-1] + 1, len(text) * k // pieces))
        if found is None:
            break
        starts.append(found.start())
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]


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
            samples += [tokenize(tokenizer, t)[:seqlen] for t in read_jsonl(f)]
    if txt:
        ids = tokenize(tokenizer, "\n\n".join(read_text_file(f) for f in txt))
        if len(ids) <= seqlen + 1:
            raise SparsezipError(f"calibration text has {len(ids)} tokens, fewer than --calib_seqlen {seqlen}")
        if n_samples * seqlen > 2 * len(ids):
            log.warning("%d calibration windows of %d tokens draw %.1f times the %d tokens of the text: they repeat "
                        "it, which costs time and adds little; give more text or fewer --calib_samples",
                        n_samples, seqlen, n_samples * seqlen / len(ids), len(ids))
        rng = random.Random(seed)
        for _ in range(n_samples):
            i = rng.randint(0, len(ids) - seqlen - 1)
            samples.append(ids[i:i + seqlen])
    samples = [s for s in samples if len(s) > 1]
    if not samples:
        raise SparsezipError("no calibration samples: give --calib files with text in them")
    distinct = len(torch.unique(torch.cat(samples)))
    if distinct < MIN_DISTINCT_CALIBRATION_TOKENS:
        raise SparsezipError(f"the calibration samples hold only {distinct} distinct tokens (at least "
                             f"{MIN_DISTINCT_CALIBRATION_TOKENS} needed): give varied text such as prose or code")
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
