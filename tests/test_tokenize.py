"""Calibration tokenization without transformers: the same ids as AutoTokenizer, also when encoded in pieces."""

from __future__ import annotations

import json
import shutil

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from sparsezip_demo.assets import austen_files, demo_model_dir
from sparsezip.data import SAFE_CUT, cut, encode_long, load_tokenizer, plain_tokenizer, tokenize

EDGE_CASES = [
    "", "a", "\n", "\n\n", "Hello\nWorld", "Hello \nWorld", "end.\nNext", "x\n\nY", "word\n  Indented", "12\n34\nab",
    "tab\tthen\nLine", "carriage\r\nReturn", "é\nÉcole\nzebra", "<|im_end|>text\nAfter<|im_start|>",
    "  leading spaces\nA", "I'm\nShe's\nwe'll", "\n" * 5 + "Z",
]


@pytest.fixture(scope="module")
def demo_dir():
    return demo_model_dir()


@pytest.fixture(scope="module")
def one_book() -> str:
    return austen_files(["persuasion"])[0].read_text(encoding="utf-8")


@pytest.mark.parametrize("which", ["demo", "tiny"])
def test_plain_tokenizer_gives_the_autotokenizer_ids(which, demo_dir, tiny_dir, one_book):
    folder = demo_dir if which == "demo" else tiny_dir("llama")
    tokenizer = load_tokenizer(folder)
    assert isinstance(tokenizer, Tokenizer)  # transformers is not needed for these folders
    reference = AutoTokenizer.from_pretrained(folder)
    for text in EDGE_CASES + [one_book[:300_000]]:
        assert tokenize(tokenizer, text).tolist() == reference(text, verbose=False)["input_ids"], repr(text[:40])


def test_encoding_in_pieces_gives_the_whole_text_ids(demo_dir, one_book):
    tokenizer = plain_tokenizer(demo_dir)
    pieces = cut(one_book, 64)
    assert len(pieces) == 64 and "".join(pieces) == one_book
    whole = tokenizer.encode(one_book).ids
    assert encode_long(tokenizer, one_book) == whole
    merged = [i for e in tokenizer.encode_batch(pieces, add_special_tokens=False) for i in e.ids]
    assert merged == whole
    # the control: cutting at arbitrary places does change the ids, so the comparison above can fail
    naive = [one_book[i:i + 10_007] for i in range(0, len(one_book), 10_007)]
    assert [i for e in tokenizer.encode_batch(naive, add_special_tokens=False) for i in e.ids] != whole


def test_safe_cuts_are_after_a_newline_that_ends_a_line_of_text():
    text = "One line.\nTwo\n\nThree \nfour\nFive"
    assert [m.start() for m in SAFE_CUT.finditer(text)] == [text.index("Two"), text.index("Five")]
    assert cut("no newline at all", 4) == ["no newline at all"]


@pytest.mark.parametrize("change", [{"add_bos_token": True}, {"tokenizer_class": "LlamaTokenizer"},
                                    {"bos_token": "<|not_in_file|>"}])
def test_configs_that_transformers_would_change_fall_back_to_it(change, tiny_dir, tmp_path):
    folder = tmp_path / "tok"
    shutil.copytree(tiny_dir("llama"), folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.update(change)
    config_path.write_text(json.dumps(config))
    assert plain_tokenizer(folder) is None
    tokenizer = load_tokenizer(folder)
    assert not isinstance(tokenizer, Tokenizer)
    text = "It is a truth universally acknowledged.\nA single man"
    assert tokenize(tokenizer, text).tolist() == AutoTokenizer.from_pretrained(folder)(text)["input_ids"]
