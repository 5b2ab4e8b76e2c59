"""Bad input through the command line: one clear error line, a non-zero exit, and nothing lost.

Every refusal must print exactly one non-empty stderr line starting with "sparsezip: error:",
never a traceback, and leave no output folder and no `.NAME.tmp-*` sibling behind. The CLI runs
in-process (`sparsezip.cli.main`) so the whole file stays fast; one test runs a real process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sparsezip.cli import main
from sparsezip.compress import compress
from sparsezip.config import SparsifyConfig, read_json, write_json
from sparsezip.formats import COMPRESSED_FILE, DESCRIPTION_FILE, SPARSE_STEM
from sparsezip.sparsify import sparsify

REPO = Path(__file__).resolve().parents[1]
SPARSE_FILE = f"{SPARSE_STEM}.safetensors"
PART0 = "part0-of-2"


@dataclass(frozen=True)
class Pipeline:
    dense: Path
    sparse: Path  # W16A16S
    packed: Path  # W16A16SC, TP=1
    packed2: Path  # W16A16SC, TP=2


@pytest.fixture(scope="module")
def pipe(tiny_dir, text_file, tmp_path_factory) -> Pipeline:
    """One tiny llama (4 heads / 2 KV heads) taken through the whole pipeline, built once per module."""
    root = tmp_path_factory.mktemp("errors-pipe")
    dense = tiny_dir("llama")
    sparse = sparsify(dense, root / "s", SparsifyConfig(method="wanda", sparsity=0.5, calib=[text_file],
                                                        calib_samples=4, calib_seqlen=64))
    compress(sparse, root / "c1", tp=1)
    compress(sparse, root / "c2", tp=2)
    return Pipeline(dense, sparse, root / "c1", root / "c2")


# ----------------------------------------------------------------------------- helpers


def leftovers(folder: Path) -> list[str]:
    """Temporary siblings (`.NAME.tmp-*`, `.NAME.old-*`) that a finished command must not leave."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and ("tmp-" in p.name or "old-" in p.name))


def refused(capsys, argv: list[str], out: Path | None = None, watch: tuple[Path, ...] = ()) -> str:
    """Run the CLI on bad input and check the product rule; returns the error line for content checks.

    `out` is an output folder that must not appear; `watch` are further folders whose parents
    must stay free of temporary leftovers.
    """
    capsys.readouterr()  # forget output of earlier steps
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc != 0, f"exit code 0 for {argv}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith("sparsezip: error: "), err
    if out is not None:
        assert not out.exists(), f"{out} was created"
        assert leftovers(out.parent) == []
    for folder in watch:
        assert leftovers(folder.parent) == []
    return lines[0]


def succeeds(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


def clone(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def fingerprint(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, to prove an input was left untouched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def truncate_to_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def edit_json(path: Path, change) -> None:
    data = read_json(path)
    change(data)
    write_json(path, data)


def safetensors_layout(path: Path) -> tuple[int, dict[str, dict]]:
    """(byte where the data region starts, header entries) of a safetensors file."""
    with open(path, "rb") as f:
        header_len = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    return 8 + header_len, header


def commands_on(folder: Path, text_file: Path, out: Path) -> dict[str, list]:
    """argv of every command that reads `folder`, with `out` as the output of those that write."""
    return {
        "sparsify": ["sparsify", "--model_path", folder, "--save_path", out, "--method", "magnitude"],
        "compress": ["compress", "--model_path", folder, "--save_directory", out],
        "run": ["run", "--model_path", folder, "--max_output_length", "2"],
        "eval": ["eval", "--model_path", folder, "--data", text_file, "--seqlen", "32", "--max_windows", "1"],
        "inspect": ["inspect", folder],
    }


ALL_COMMANDS = ("sparsify", "compress", "run", "eval", "inspect")


# ----------------------------------------------------------------------------- 1, 2, 3: the model folder itself


@pytest.mark.parametrize("command", ["sparsify", "compress", "run", "eval"])
def test_omitted_model_path_flag_is_one_line(capsys, command, tmp_path, text_file):
    argv = commands_on(Path("unused"), text_file, tmp_path / "out")[command]
    i = argv.index("--model_path")
    line = refused(capsys, argv[:i] + argv[i + 2:], out=tmp_path / "out")
    assert "--model_path" in line and command in line


def test_no_command_and_bad_flag_values_are_one_line(capsys, tmp_path, pipe):
    assert "COMMAND" in refused(capsys, [])
    assert "--sparsity" in refused(capsys, ["sparsify", "--model_path", pipe.dense, "--save_path",
                                            tmp_path / "out", "--sparsity", "half"], out=tmp_path / "out")
    assert "--bogus" in refused(capsys, ["inspect", pipe.sparse, "--bogus"])


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_model_path_that_does_not_exist(capsys, command, tmp_path, text_file):
    missing = tmp_path / "no-such-model"
    line = refused(capsys, commands_on(missing, text_file, tmp_path / "out")[command], out=tmp_path / "out")
    assert str(missing) in line and "does not exist" in line


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_folder_without_config_json(capsys, command, tmp_path, pipe, text_file):
    source = pipe.sparse if command == "compress" else pipe.dense
    folder = clone(source, tmp_path / "model")
    (folder / "config.json").unlink()
    line = refused(capsys, commands_on(folder, text_file, tmp_path / "out")[command], out=tmp_path / "out")
    assert "config.json" in line


@pytest.mark.parametrize("command", ["sparsify", "run"])
def test_pickle_only_weights_are_never_loaded(capsys, command, tmp_path, pipe, text_file):
    folder = clone(pipe.dense, tmp_path / "model")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")  # any bytes: they must not be read
    line = refused(capsys, commands_on(folder, text_file, tmp_path / "out")[command], out=tmp_path / "out")
    assert "pytorch_model.bin" in line and "pickle" in line and "safetensors" in line


@pytest.mark.parametrize("command", ["sparsify", "compress", "run", "eval"])
def test_unsupported_architecture(capsys, command, tmp_path, pipe, text_file):
    source = {"compress": pipe.sparse, "run": pipe.packed}.get(command, pipe.dense)
    folder = clone(source, tmp_path / "model")
    edit_json(folder / "config.json", lambda c: c.update(model_type="gpt2"))
    line = refused(capsys, commands_on(folder, text_file, tmp_path / "out")[command], out=tmp_path / "out")
    assert "gpt2" in line and "llama" in line


DELETE = object()
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
# (config.json field, bad value, what the one error line must say): every field the code reads, in type and range.
BAD_CONFIG_FIELDS = [
    ("num_attention_heads", DELETE, "num_attention_heads must be an integer from 1 to 4096, got missing"),
    ("num_attention_heads", 0, "num_attention_heads must be an integer from 1 to 4096, got 0"),
    ("num_attention_heads", -4, "got -4"),
    ("num_attention_heads", "4", "got '4'"),
    ("num_attention_heads", 4.0, "got 4.0"),
    ("num_attention_heads", True, "got True"),
    ("num_key_value_heads", 3, "num_key_value_heads must be a divisor of num_attention_heads (4), got 3"),
    ("hidden_size", 10**9, "hidden_size must be an integer from 1 to 1048576"),
    ("intermediate_size", "128", "intermediate_size must be an integer"),
    ("num_hidden_layers", 0, "num_hidden_layers must be an integer from 1 to 4096, got 0"),
    ("num_hidden_layers", -2, "num_hidden_layers must be an integer"),
    ("vocab_size", 10**12, "vocab_size must be an integer from 1 to 16777216"),
    ("head_dim", 15, "head_dim must be an even number"),
    ("head_dim", 0, "head_dim must be an integer"),
    ("rms_norm_eps", "1e-6", "rms_norm_eps must be a number above 0 and below 1.0, got '1e-6'"),
    ("rms_norm_eps", 0, "rms_norm_eps must be a number above 0"),
    ("rms_norm_eps", -1e-6, "rms_norm_eps must be a number above 0"),
    ("max_position_embeddings", 0, "max_position_embeddings must be an integer"),
    ("tie_word_embeddings", "no", "tie_word_embeddings must be true or false"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": "big"}, "rope_theta must be a number above 0"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": float("nan")}, "rope_theta must be a number above 0"),
    ("rope_parameters", "yes", "rope_parameters must be an object"),
    ("rope_parameters", {**LLAMA3, "low_freq_factor": None}, "rope_scaling: low_freq_factor must be a number above 0, "
                                                             "got missing"),
    ("rope_parameters", {**LLAMA3, "high_freq_factor": 0.5}, "rope_scaling: high_freq_factor must be above "
                                                            "low_freq_factor"),
    ("rope_parameters", {**LLAMA3, "original_max_position_embeddings": 64.5}, "original_max_position_embeddings"),
    # Well-formed but disagreeing with the weights: found before any work, not mid-run.
    ("vocab_size", 1000, "model.embed_tokens.weight has shape"),
    ("intermediate_size", 96, "mlp.gate_proj.weight has shape [128, 64], its config.json implies [96, 64]"),
    ("num_hidden_layers", 1, "stores decoder layer 1, but its config.json says num_hidden_layers = 1"),
    ("num_hidden_layers", 3, "lacks tensor model.layers.2."),
]


@pytest.mark.parametrize("field, value, expected", BAD_CONFIG_FIELDS,
                         ids=[f"{f}={'missing' if v is DELETE else v}" for f, v, _ in BAD_CONFIG_FIELDS])
@pytest.mark.parametrize("command", ["sparsify", "run"])
def test_malformed_config_field_is_one_line_naming_it(capsys, command, field, value, expected, tmp_path, pipe,
                                                       text_file):
    folder = clone(pipe.dense, tmp_path / "model")

    def change(config: dict) -> None:
        config.pop(field) if value is DELETE else config.update({field: value})

    edit_json(folder / "config.json", change)
    line = refused(capsys, commands_on(folder, text_file, tmp_path / "out")[command], out=tmp_path / "out")
    assert expected in line and str(folder) in line, line


# ----------------------------------------------------------------------------- 4: bf16 source (a success)


def test_bf16_source_is_sparsified_to_fp16_with_an_overflow_warning(capsys, caplog, tiny_dir, tmp_path,
                                                                      text_file):
    source = clone(tiny_dir("llama", dtype=torch.bfloat16, tie_word_embeddings=False), tmp_path / "bf16")
    weights = load_file(source / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in weights.values())
    weights["lm_head.weight"][0, 0] = 1e6  # representable in bf16, beyond fp16's 65504
    save_file(weights, str(source / "model.safetensors"), metadata={"format": "pt"})

    out = tmp_path / "s"
    with caplog.at_level(logging.WARNING, logger="sparsezip"):
        succeeds(capsys, ["sparsify", "--model_path", source, "--save_path", out, "--calib", text_file,
                          "--calib_samples", "4", "--calib_seqlen", "64"])
    warnings = [r.getMessage() for r in caplog.records if r.name == "sparsezip" and r.levelno == logging.WARNING]
    assert any("lm_head.weight" in m and "fp16" in m for m in warnings), warnings
    with safe_open(str(out / SPARSE_FILE), "pt") as f:
        assert set(f.keys()) == set(weights)
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
        assert torch.isinf(f.get_tensor("lm_head.weight")[0, 0])
    config = read_json(out / "config.json")
    assert config["torch_dtype"] == "float16" and config.get("dtype", "float16") == "float16"
    assert leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- 5, 6: tensor-parallel sizes


@pytest.mark.parametrize("command", ["run", "eval"])
def test_tp_mismatch_at_run_time_points_to_torchrun(capsys, command, pipe, text_file, tmp_path):
    line = refused(capsys, commands_on(pipe.packed2, text_file, tmp_path / "out")[command], watch=(pipe.packed2,))
    assert "torchrun --nproc_per_node 2" in line


@pytest.mark.parametrize("tp", ["3", "4", "0"])
def test_tp_that_does_not_divide_the_heads_lists_valid_sizes(capsys, tp, pipe, tmp_path):
    out = tmp_path / "c"
    line = refused(capsys, ["compress", "--model_path", pipe.sparse, "--save_directory", out, "--tp", tp], out=out)
    assert f"TP size {tp}" in line and "valid sizes: 1, 2" in line


# ----------------------------------------------------------------------------- 7: truncated files


@pytest.mark.parametrize("command", ["run", "eval", "compress", "inspect", "sparsify"])
def test_truncated_sparse_weights(capsys, command, pipe, text_file, tmp_path):
    if command == "sparsify":  # sparsify reads a dense folder: truncate its model.safetensors instead
        folder = clone(pipe.dense, tmp_path / "s")
        truncate_to_half(folder / "model.safetensors")
        line = refused(capsys, commands_on(folder, text_file, tmp_path / "out")[command], out=tmp_path / "out")
        assert "model.safetensors" in line and "truncated" in line
        return
    folder = clone(pipe.sparse, tmp_path / "s")
    truncate_to_half(folder / SPARSE_FILE)
    line = refused(capsys, commands_on(folder, text_file, tmp_path / "out")[command], out=tmp_path / "out")
    assert SPARSE_FILE in line and "truncated" in line


@pytest.mark.parametrize("command", ["run", "eval", "inspect"])
def test_truncated_compressed_part(capsys, command, pipe, text_file, tmp_path):
    folder = clone(pipe.packed, tmp_path / "c")
    truncate_to_half(folder / "part0-of-1" / COMPRESSED_FILE)
    line = refused(capsys, commands_on(folder, text_file, tmp_path / "out")[command], watch=(folder,))
    assert COMPRESSED_FILE in line and "truncated" in line


def test_compress_refuses_a_compressed_folder(capsys, pipe, text_file, tmp_path):
    line = refused(capsys, commands_on(pipe.packed, text_file, tmp_path / "out")["compress"], out=tmp_path / "out")
    assert "not a W16A16S folder" in line


# ----------------------------------------------------------------------------- 8: description vs weights


def drop_entry(name: str):
    return lambda d: d.pop(name)


def add_entry(name: str, kind: str):
    return lambda d: d.update({name: kind})


SPARSE_EDITS = {
    "missing": (drop_entry("model.layers.1.mlp.up_proj.weight"), "model.layers.1.mlp.up_proj.weight"),
    "extra": (add_entry("model.layers.9.mlp.up_proj.weight", "W16A16S"), "model.layers.9.mlp.up_proj.weight"),
}


@pytest.mark.parametrize("command", ["run", "compress"])
@pytest.mark.parametrize("edit", sorted(SPARSE_EDITS))
def test_sparse_description_that_disagrees_with_the_weights(capsys, command, edit, pipe, text_file, tmp_path):
    change, name = SPARSE_EDITS[edit]
    folder = clone(pipe.sparse, tmp_path / "s")
    edit_json(folder / DESCRIPTION_FILE, change)
    line = refused(capsys, commands_on(folder, text_file, tmp_path / "out")[command], out=tmp_path / "out")
    assert "disagrees with the weights" in line and name in line


def edit_metadata(key: str, value):
    def change(d):
        if value is None:
            d["metadata"].pop(key)
        else:
            d["metadata"][key] = value
    return change


PART_EDITS = {
    "missing": (drop_entry("model.layers.0.mlp.down_proj.index"), "model.layers.0.mlp.down_proj.index"),
    "extra": (add_entry("model.layers.0.mlp.extra.weight", "FLOAT"), "model.layers.0.mlp.extra.weight"),
    "outdim": (add_entry("model.layers.0.self_attn.qkv_proj.weight.outdim", 65), ".outdim is 65"),
    "no-outdim": (drop_entry("model.layers.0.self_attn.o_proj.weight.outdim"), "o_proj.weight.outdim"),
    "stream-as-float": (add_entry("model.layers.0.self_attn.qkv_proj.weight", "FLOAT"),
                        "model.layers.0.self_attn.qkv_proj.weight is described FLOAT, but a compressed linear"),
    "all-three-float": (lambda d: d.update({f"model.layers.0.mlp.down_proj{s}": "FLOAT"
                                             for s in (".weight", ".index", ".info")}),
                        "model.layers.0.mlp.down_proj.weight is described FLOAT"),
    "tp-size": (edit_metadata("tp_size", 2), "metadata tp_size is 2, but the folder is part0-of-1"),
    "rank": (edit_metadata("rank", 1), "metadata rank is 1, but the folder is part0-of-1"),
    "no-metadata": (lambda d: d.pop("metadata"), "metadata tp_size is None"),
    "codec-name": (edit_metadata("codec", "huff-v2"), "metadata says codec 'huff-v2'"),
    "codec-id": (edit_metadata("codec_id", 2), "id 2, but the streams are nibble-v3"),
    "codec-version": (edit_metadata("codec_version", "9.9"), "version '9.9'"),
    "format-version": (lambda d: d.update(version="9.0.0"), "is format version 9.0.0; this sparsezip reads"),
}


@pytest.mark.parametrize("command", ["run", "inspect"])
@pytest.mark.parametrize("edit", sorted(PART_EDITS))
def test_part_description_that_disagrees_with_the_weights(capsys, command, edit, pipe, text_file, tmp_path):
    change, expected = PART_EDITS[edit]
    folder = clone(pipe.packed, tmp_path / "c")
    edit_json(folder / "part0-of-1" / DESCRIPTION_FILE, change)
    line = refused(capsys, commands_on(folder, text_file, tmp_path / "out")[command], watch=(folder,))
    assert expected in line


def test_swapped_part_folders_are_refused(capsys, pipe, text_file, tmp_path):
    """Ranks renamed into each other's folders would run with the other rank's rows: the metadata says so."""
    folder = clone(pipe.packed2, tmp_path / "c")
    (folder / "part0-of-2").rename(folder / "swap")
    (folder / "part1-of-2").rename(folder / "part0-of-2")
    (folder / "swap").rename(folder / "part1-of-2")
    line = refused(capsys, commands_on(folder, text_file, tmp_path / "out")["inspect"], watch=(folder,))
    assert "metadata rank is 1, but the folder is part0-of-2" in line


def shard(folder: Path) -> tuple[Path, dict]:
    """A copy of the W16A16S folder's weights as two shards and an index; returns (index path, its JSON)."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / SPARSE_FILE)
    (folder / SPARSE_FILE).unlink()
    names = sorted(tensors)
    files = {f"{SPARSE_STEM}-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
    for file, part in files.items():
        save_file({n: tensors[n] for n in part}, folder / file)
    index = {"metadata": {}, "weight_map": {n: file for file, part in files.items() for n in part}}
    write_json(folder / f"{SPARSE_FILE}.index.json", index)
    return folder / f"{SPARSE_FILE}.index.json", index


SHARD_EDITS = {
    "wrong-shard": (lambda m, n: m.update({n[0]: m[n[1]]}), "mapped to another shard or not at all"),
    "unmapped": (lambda m, n: m.pop(n[0]), "mapped to another shard or not at all"),
    "made-up": (lambda m, n: m.update({"model.layers.5.mlp.up_proj.weight": m[n[0]]}),
                "mapped but stored nowhere ['model.layers.5.mlp.up_proj.weight']"),
    "outside": (lambda m, n: m.update({n[0]: "../elsewhere.safetensors"}), "is not a file name of this folder"),
    "number": (lambda m, n: m.update({n[0]: 5}), "weight_map entry 5 is not a file name"),
}


@pytest.mark.parametrize("command", ["run", "compress", "inspect"])
@pytest.mark.parametrize("edit", sorted(SHARD_EDITS))
def test_a_shard_index_that_disagrees_with_its_shards(capsys, command, edit, pipe, text_file, tmp_path):
    folder = clone(pipe.sparse, tmp_path / "s")
    index_path, index = shard(folder)
    change, expected = SHARD_EDITS[edit]
    weight_map = index["weight_map"]
    first = min(weight_map)
    names = [first, min(n for n in weight_map if weight_map[n] != weight_map[first])]  # one tensor of each shard
    change(index["weight_map"], names)
    write_json(index_path, index)
    line = refused(capsys, commands_on(folder, text_file, tmp_path / "out")[command], out=tmp_path / "out")
    assert expected in line


def test_a_sharded_folder_as_written_still_runs(capsys, pipe, text_file, tmp_path):
    """The check above must not refuse a faithful index."""
    folder = clone(pipe.sparse, tmp_path / "s")
    shard(folder)
    assert "Answer[0]:" in succeeds(capsys, commands_on(folder, text_file, tmp_path / "out")["run"])


# ----------------------------------------------------------------------------- 9: output paths


@pytest.mark.parametrize("command", ["sparsify", "compress"])
def test_existing_output_is_refused_unless_overwrite(capsys, command, pipe, text_file, tmp_path):
    source = pipe.sparse if command == "compress" else pipe.dense
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    argv = commands_on(source, text_file, out)[command]
    line = refused(capsys, argv, watch=(out,))
    assert "already exists" in line and "--overwrite" in line
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    succeeds(capsys, argv + ["--overwrite"])
    assert not (out / "keep.txt").exists()
    assert (out / "config.json").is_file()
    assert (out / (DESCRIPTION_FILE if command == "sparsify" else "part0-of-1")).exists()
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["plain", "overwrite"])
@pytest.mark.parametrize("command", ["sparsify", "compress"])
@pytest.mark.parametrize("target", ["input", "parent", "inside"])
def test_output_over_the_input_is_refused_and_the_input_untouched(capsys, command, target, overwrite, pipe,
                                                                  text_file, tmp_path):
    folder = clone(pipe.sparse if command == "compress" else pipe.dense, tmp_path / "model" / "in")
    before = fingerprint(tmp_path / "model")
    out = {"input": folder, "parent": folder.parent, "inside": folder / "out"}[target]
    line = refused(capsys, commands_on(folder, text_file, out)[command] + overwrite, watch=(out,))
    assert ("lies inside the input" if target == "inside" else "would overwrite the input") in line
    assert fingerprint(tmp_path / "model") == before
    assert leftovers(tmp_path) == []


def test_compressing_a_folder_without_a_tokenizer_warns(capsys, caplog, pipe, text_file, tmp_path):
    folder = clone(pipe.sparse, tmp_path / "s")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink(missing_ok=True)
    succeeds(capsys, commands_on(folder, text_file, tmp_path / "out")["compress"])
    assert "has no tokenizer files" in caplog.text


def test_stream_with_several_prompts_says_it_prints_them_when_done(capsys, caplog, pipe, text_file, tmp_path):
    argv = commands_on(pipe.packed, text_file, tmp_path / "out")["run"] + ["--stream", "--input_texts", "a", "b"]
    assert "Answer[1]:" in succeeds(capsys, argv)
    assert "the answers to 2 prompts print when done" in caplog.text


def test_overwrite_never_replaces_the_calibration_text(capsys, pipe, text_file, tmp_path):
    calib = tmp_path / "calib.txt"
    shutil.copy(text_file, calib)
    before = calib.read_bytes()
    argv = ["sparsify", "--model_path", pipe.dense, "--save_path", calib, "--calib", calib, "--method", "wanda",
            "--calib_samples", "2", "--calib_seqlen", "32", "--overwrite"]
    line = refused(capsys, argv, watch=(calib,))
    assert "would overwrite the input" in line
    assert calib.read_bytes() == before


@pytest.mark.parametrize("argv, expected", [
    (["compress", "--workers", "0"], "--workers must be at least 1, got 0"),
    (["run", "--max_batch_size", "0"], "--max_batch_size must be at least 1, got 0"),
], ids=["compress-workers", "run-batch"])
def test_counts_below_one_are_refused_before_any_work(capsys, argv, expected, pipe, text_file, tmp_path):
    """One line: refused before the model loads (whose progress lines would come first)."""
    command, *option = argv
    line = refused(capsys, commands_on(pipe.sparse, text_file, tmp_path / "out")[command] + option,
                   out=tmp_path / "out")
    assert expected in line


# ----------------------------------------------------------------------------- 10, 11: compressed folder damage


def flip_middle_byte(path: Path) -> str:
    """Invert one byte in the middle of the data region; returns the tensor hit (checked to be a codec stream)."""
    start, header = safetensors_layout(path)
    middle = (path.stat().st_size - start) // 2
    hit = next(name for name, t in header.items() if t["data_offsets"][0] <= middle < t["data_offsets"][1])
    assert header[hit]["dtype"] == "I8" and hit.endswith(".weight"), f"the middle byte lies in {hit}"
    data = bytearray(path.read_bytes())
    data[start + middle] ^= 0xFF
    path.write_bytes(bytes(data))
    return hit


@pytest.mark.parametrize("command", ["run", "eval", "inspect"])
def test_corrupted_compressed_stream_fails_its_crc(capsys, command, pipe, text_file, tmp_path):
    folder = clone(pipe.packed, tmp_path / "c")
    hit = flip_middle_byte(folder / "part0-of-1" / COMPRESSED_FILE)
    line = refused(capsys, commands_on(folder, text_file, tmp_path / "out")[command], watch=(folder,))
    assert "CRC mismatch" in line
    if command != "inspect":  # the loader names the damaged file and tensor (inspect's report.py does not yet)
        assert f"part0-of-1/{COMPRESSED_FILE}: {hit}:" in line


@pytest.mark.parametrize("command", ["run", "inspect"])
def test_missing_part_folder(capsys, command, pipe, text_file, tmp_path):
    folder = clone(pipe.packed2, tmp_path / "c")
    shutil.rmtree(folder / "part1-of-2")
    line = refused(capsys, commands_on(folder, text_file, tmp_path / "out")[command], watch=(folder,))
    assert "missing part1-of-2" in line


@pytest.mark.parametrize("command", ["run", "inspect"])
def test_a_part_folder_beyond_the_tp_size(capsys, command, pipe, text_file, tmp_path):
    folder = clone(pipe.packed2, tmp_path / "c")
    (folder / "part2-of-2").mkdir()
    line = refused(capsys, commands_on(folder, text_file, tmp_path / "out")[command], watch=(folder,))
    assert "has part2-of-2, a rank beyond its TP size 2" in line


def test_a_misshapen_tensor_in_a_part_is_one_line_before_any_layout_is_timed(capsys, pipe, text_file, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = clone(pipe.packed, tmp_path / "c")
    part = folder / "part0-of-1" / COMPRESSED_FILE
    tensors = load_file(part)
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1].clone()
    save_file(tensors, part)
    line = refused(capsys, commands_on(folder, text_file, tmp_path / "out")["run"], watch=(folder,))
    assert "model.norm.weight has shape (63,)" in line


def test_a_missing_tensor_names_the_file(pipe):
    from sparsezip.checkpoint import TensorReader
    from sparsezip.errors import SparsezipError

    with pytest.raises(SparsezipError, match=f"tensor model.bogus.weight is missing from .*{SPARSE_FILE}$"):
        TensorReader([pipe.sparse / SPARSE_FILE]).get("model.bogus.weight")


# ----------------------------------------------------------------------------- 12, 13: sparsify / quant options


@pytest.mark.parametrize("option, expected", [
    (["--sparsity", "1.0"], "--sparsity"),
    (["--sparsity", "1.5"], "--sparsity"),
    (["--sparsity", "-0.1"], "--sparsity"),
    (["--sparsity", "nan"], "--sparsity"),
    (["--method", "bogus"], "unknown pruning method 'bogus'"),
    (["--pattern", "2:x"], "'2:x'"),
    (["--pattern", "5:4"], "'5:4'"),
    (["--pattern", "0:4"], "'0:4'"),
    (["--pattern", "2:4:8"], "'2:4:8'"),
    (["--pattern", "1:3"], "1:3"),  # hidden 64, heads*head_dim 64, MLP 128: none divisible by 3
    (["--pattern", "2:256"], "2:256"),
    (["--calib_seqlen", "0"], "--calib_seqlen"),
    (["--part_file_size", "0"], "--part_file_size must be a positive number of GB, got 0.0"),
    (["--part_file_size", "inf"], "--part_file_size must be a positive number of GB, got inf"),
    (["--part_file_size", "nan"], "--part_file_size must be a positive number of GB, got nan"),
    (["--method", "wanda", "--owl", "--owl_lambda", "5"], "--owl_lambda must keep every layer's sparsity in [0, 1)"),
    (["--method", "wanda", "--owl", "--owl_lambda", "0.25"], "it must be in [0, 0.25), got 0.25"),
    (["--method", "wanda", "--owl", "--owl_lambda", "-0.1"], "--owl_lambda must keep"),
    (["--method", "wanda", "--owl", "--owl_lambda", "nan"], "--owl_lambda must keep"),
    (["--method", "wanda", "--owl", "--owl_threshold", "-1"], "--owl_threshold must be a positive number"),
    (["--method", "wanda", "--owl", "--owl_threshold", "nan"], "--owl_threshold must be a positive number"),
    (["--method", "wanda", "--owl_lambda", "0.1"], "--owl_threshold and --owl_lambda tune OWL: add --owl"),
    (["--calib_samples", "0"], "--calib_samples"),
    (["--method", "wanda", "--targets", "dense"], "--targets dense needs --method float_sparse"),
    (["--target_blend", "0.5"], "--target_blend mixes the dense model's outputs into float_sparse's target: it needs"),
    (["--targets", "dense", "--target_blend", "0"], "--target_blend must be in (0, 1], got 0.0"),
    (["--targets", "dense", "--target_blend", "1.5"], "--target_blend must be in (0, 1], got 1.5"),
    (["--targets", "dense", "--target_blend", "nan"], "--target_blend must be in (0, 1], got nan"),
    (["--admm_rho", "0"], "--admm_rho must be a positive number"),
    (["--admm_rho", "nan"], "--admm_rho must be a positive number"),
    (["--admm_rho", "inf"], "--admm_rho must be a positive number"),
    (["--method", "sparsegpt", "--admm_rho", "0.6"], "--method sparsegpt has none"),
    (["--admm_damp", "0"], "--admm_damp must be auto or a positive number"),
    (["--admm_damp", "nan"], "--admm_damp must be auto or a positive number"),
    (["--admm_damp", "often"], "--admm_damp must be auto or a positive number"),
    (["--method", "sparsegpt", "--admm_damp", "auto"], "--admm_damp is float_sparse's damping"),
    (["--method", "wanda", "--mask_scope", "row"], "--mask_scope chooses float_sparse's mask ranking"),
    (["--mask_scope", "column"], "--mask_scope"),
    (["--pattern", "2:4", "--mask_scope", "row"], "--mask_scope row applies to unstructured masks"),
    (["--mask_score", "size"], "--mask_score must be magnitude or obs, got 'size'"),
    (["--method", "sparsegpt", "--mask_score", "obs"], "--mask_score chooses float_sparse's mask score"),
], ids=lambda v: v if isinstance(v, str) else "=".join(v))
def test_bad_sparsify_options(capsys, option, expected, pipe, text_file, tmp_path):
    out = tmp_path / "s"
    argv = ["sparsify", "--model_path", pipe.dense, "--save_path", out, "--calib", text_file,
            "--calib_samples", "2", "--calib_seqlen", "32"]
    line = refused(capsys, argv + option, out=out)
    assert expected in line


# (file name, bytes, what the one error line must say): calibration and evaluation text that cannot be used.
BAD_TEXTS = [
    ("latin1.txt", "Café au lait, s'il vous plaît. ".encode("latin-1") * 50, "is not UTF-8 text (byte 3)"),
    ("latin1.jsonl", b'{"text": "caf\xe9"}\n', "is not UTF-8 text"),
    ("binary.txt", b"\x7fELF\x02\x01\x01\x00" + bytes(200), "holds NUL characters"),
    ("empty.txt", b"", "tokens, fewer than"),
    ("digits.txt", b"1234567890", "tokens, fewer than"),
    ("repeated.txt", b"the cat " * 2000, "distinct tokens"),
    ("broken.jsonl", b'{"text": "a"}\n{"text": \n', "broken.jsonl:2 is not valid JSON"),
    ("fieldless.jsonl", b'{"body": "a"}\n', "has no string field text or inputs_pretokenized"),
    ("missing.txt", None, "does not exist"),
]


CALIBRATION_ONLY = ("repeated.txt",)  # any text can be evaluated; calibration needs varied text
TEXT_CASES = [(command, *case) for command in ("sparsify", "eval") for case in BAD_TEXTS
              if command == "sparsify" or not (case[0].endswith(".jsonl") or case[0] in CALIBRATION_ONLY)]


@pytest.mark.parametrize("command, name, data, expected", TEXT_CASES, ids=[f"{c}-{n}" for c, n, _, _ in TEXT_CASES])
def test_unusable_text_is_one_line_and_fast(capsys, command, name, data, expected, pipe, tmp_path):
    text = tmp_path / name
    if data is not None:
        text.write_bytes(data)
    out = tmp_path / "s"
    argv = {"sparsify": ["sparsify", "--model_path", pipe.dense, "--save_path", out, "--calib", text,
                         "--calib_samples", "2", "--calib_seqlen", "32"],
            "eval": ["eval", "--model_path", pipe.dense, "--data", text, "--seqlen", "32"]}[command]
    line = refused(capsys, argv, out=out)
    assert expected in line and (name in line or "tokens" in line), line


@pytest.mark.parametrize("option, expected", [
    (["--seqlen", "0"], "--seqlen must be from 2 to the model's context of 256 tokens, got 0"),
    (["--seqlen", "1"], "got 1"),
    (["--seqlen", "100000"], "got 100000"),
    (["--batch_size", "0"], "--batch_size must be at least 1"),
    (["--max_windows", "0"], "--max_windows must be at least 1"),
    (["--data", "."], "data file . is a folder; pass the text files in it"),
], ids=lambda v: v if isinstance(v, str) else "=".join(v))
def test_bad_eval_options(capsys, option, expected, pipe, text_file):
    line = refused(capsys, ["eval", "--model_path", pipe.packed, "--data", text_file, "--seqlen", "32"] + option)
    assert expected in line


@pytest.mark.parametrize("port", ["70000", "-1", "http"])
def test_a_port_out_of_range_is_a_usage_error(capsys, port, pipe):
    capsys.readouterr()
    assert main(["serve", "--model_path", str(pipe.packed), "--port", port]) == 2
    assert "a port is a number from 0 to 65535" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["sparsify", "run"])
def test_a_damaged_tokenizer_is_one_line(capsys, command, tmp_path, pipe, text_file):
    folder = clone(pipe.dense, tmp_path / "model")
    (folder / "tokenizer.json").write_text("garbage{")
    argv = commands_on(folder, text_file, tmp_path / "out")[command]
    if command == "sparsify":
        argv += ["--method", "wanda", "--calib", text_file, "--calib_samples", "2", "--calib_seqlen", "32"]
    line = refused(capsys, argv, out=tmp_path / "out")
    assert "the tokenizer files cannot be read" in line and str(folder) in line


def test_calibration_windows_beyond_the_context_are_cut_to_it(capsys, caplog, pipe, text_file, tmp_path):
    out = tmp_path / "s"
    with caplog.at_level(logging.WARNING, logger="sparsezip"):
        succeeds(capsys, ["sparsify", "--model_path", pipe.dense, "--save_path", out, "--method", "wanda", "--calib",
                          text_file, "--calib_samples", "2", "--calib_seqlen", "100000"])
    assert "cut from 100000 to the model's context of 256 tokens" in caplog.text
    assert read_json(out / DESCRIPTION_FILE)["metadata"]["calibration_tokens"] == 2 * 256


def test_quant_type_other_than_w16a16s(capsys, pipe, tmp_path, text_file):
    out = tmp_path / "q"
    line = refused(capsys, ["quant", "--model_path", pipe.dense, "--save_path", out, "--quant_type", "w8a8",
                            "--calib", text_file], out=out)
    assert "w8a8" in line and "w16a16s" in line


def test_quant_needs_calibration_text(capsys, pipe, tmp_path):
    out = tmp_path / "q"
    line = refused(capsys, ["quant", "--model_path", pipe.dense, "--save_path", out, "--quant_type", "w16a16s"],
                   out=out)
    assert "--calib" in line


# ----------------------------------------------------------------------------- a real process


@pytest.mark.parametrize("case", ["missing-path", "tp-mismatch"])
def test_real_process_prints_one_line_and_exits_non_zero(case, pipe, tmp_path):
    """Outside pytest's capture, logging and library warnings reach stderr too; still one line."""
    folder = tmp_path / "nothing" if case == "missing-path" else pipe.packed2
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    result = subprocess.run([sys.executable, "-m", "sparsezip", "run", "--model_path", str(folder)],
                            capture_output=True, text=True, env=env, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1
    assert len(lines) == 1 and lines[0].startswith("sparsezip: error: "), result.stderr
    assert ("does not exist" if case == "missing-path" else "torchrun") in lines[0]


@pytest.mark.parametrize("world_size, exit_through", [("2", "os._exit"), ("1", "sys.exit"), (None, "sys.exit"),
                                                      ("two", "sys.exit")])
def test_a_torchrun_process_exits_without_interpreter_teardown(monkeypatch, capsys, world_size, exit_through):
    """Under torchrun the command's exit status leaves through os._exit once stdout is flushed (gloo's threads
    aborted the interpreter's exit now and then); everywhere else through sys.exit."""
    from sparsezip import cli

    def exit_now(code):
        raise SystemExit(("os._exit", code))

    def finished_command():
        print("the answer", end="")  # still in the buffer when the process leaves
        return 3

    monkeypatch.setattr(cli, "main", finished_command)
    monkeypatch.setattr(cli.os, "_exit", exit_now)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # undone after the test: run_as_process sets it when absent
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if world_size is not None:
        monkeypatch.setenv("WORLD_SIZE", world_size)
    with pytest.raises(SystemExit) as stop:
        cli.run_as_process()
    assert stop.value.code == (("os._exit", 3) if exit_through == "os._exit" else 3)
    assert capsys.readouterr().out == "the answer"


@pytest.mark.parametrize("chosen, seen", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_command_lets_openmp_threads_sleep_unless_told_otherwise(monkeypatch, chosen, seen):
    """torch's OpenMP threads spin after each op by default and then share the cores with the native kernels'
    threads: the command asks for passive waiting before torch loads, and keeps a policy the user set."""
    from sparsezip import cli

    monkeypatch.setenv("OMP_WAIT_POLICY", "placeholder")  # so that the test's change is undone afterwards
    monkeypatch.delenv("OMP_WAIT_POLICY")
    if chosen is not None:
        monkeypatch.setenv("OMP_WAIT_POLICY", chosen)
    policies = []
    monkeypatch.setattr(cli, "main", lambda: policies.append(os.environ.get("OMP_WAIT_POLICY")) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(SystemExit):
        cli.run_as_process()
    assert policies == [seen]


# ----------------------------------------------------------------------------- interruption


def sparsify_argv(pipe: Pipeline, text_file: Path, out: Path, method: str) -> list[str]:
    return [sys.executable, "-m", "sparsezip", "-q", "sparsify", "--model_path", str(pipe.dense), "--save_path",
            str(out), "--method", method, "--calib", str(text_file), "--calib_samples", "64", "--calib_seqlen", "64"]


def default_sigint() -> None:
    """In the child: Ctrl-C as in a terminal. A shell starts background jobs with SIGINT ignored (make test &), and
    Python then never installs its KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def wait_for_temp_dir(process: subprocess.Popen, out: Path, timeout: float = 120) -> Path:
    """The temporary sibling a running command writes into, as soon as it appears."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp-")]
        if found:
            return found[0]
        if process.poll() is not None:
            pytest.fail(f"the command ended before writing anything: {process.stderr.read()}")
        time.sleep(0.005)
    process.kill()
    pytest.fail("no temporary folder appeared")


@pytest.mark.slow
@pytest.mark.parametrize("sig, code, message", [(signal.SIGTERM, 143, "sparsezip: terminated"),
                                                (signal.SIGINT, 130, "sparsezip: interrupted")],
                         ids=["SIGTERM", "SIGINT"])
def test_signal_mid_run_leaves_no_output_and_no_temporary_folder(sig, code, message, pipe, text_file, tmp_path):
    out = tmp_path / "s"
    process = subprocess.Popen(sparsify_argv(pipe, text_file, out, "float_sparse"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=cli_env(), preexec_fn=default_sigint)
    wait_for_temp_dir(process, out)
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    assert process.returncode == code, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == message, err
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.slow
def test_a_killed_runs_temporary_folder_is_removed_by_the_next_run(pipe, text_file, tmp_path):
    out = tmp_path / "s"
    process = subprocess.Popen(sparsify_argv(pipe, text_file, out, "float_sparse"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=cli_env())
    stale = wait_for_temp_dir(process, out)
    process.kill()  # SIGKILL: nothing runs, the folder stays behind
    process.communicate(timeout=60)
    assert stale.is_dir() and not out.exists()
    again = subprocess.run(sparsify_argv(pipe, text_file, out, "magnitude"), capture_output=True, text=True,
                           env=cli_env(), timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"removed {stale}" in again.stderr and "killed" in again.stderr
    assert out.is_dir() and leftovers(tmp_path) == []


def test_a_running_processs_temporary_folder_is_left_alone(capsys, pipe, tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead = tmp_path / f".s.tmp-{int(finished.stdout)}-abc"  # that process has ended
    alive = tmp_path / f".s.tmp-{os.getpid()}-abc"  # this one runs
    other = tmp_path / ".t.tmp-1-abc"  # another output's
    for folder in (dead, alive, other):
        folder.mkdir()
    succeeds(capsys, ["sparsify", "--model_path", pipe.dense, "--save_path", tmp_path / "s", "--method",
                      "magnitude"])
    assert not dead.exists() and alive.is_dir() and other.is_dir()


# ----------------------------------------------------------------------------- resource faults


def run_with_file_size_limit(argv: list, limit: int) -> subprocess.CompletedProcess:
    """The CLI in a process that cannot write files beyond `limit` bytes: every write past it fails (EFBIG), the
    way a full disk fails writes, without filling one."""
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            "from sparsezip.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True,
                          env=cli_env(), timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["sparsify", "compress"])
def test_a_write_that_fails_midway_is_one_line_and_leaves_nothing(command, pipe, text_file, tmp_path):
    out = tmp_path / "out"
    argv = commands_on(pipe.sparse if command == "compress" else pipe.dense, text_file, out)[command]
    result = run_with_file_size_limit(["-q", *argv], limit=20_000)  # the tiny model's weights are ~100 kB
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and lines[-1].startswith("sparsezip: error: "), result.stderr
    assert "File too large" in lines[-1], lines[-1]
    assert not out.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("raised, code, message", [("KeyboardInterrupt", 130, "sparsezip: interrupted"),
                                                   ("cli.Terminated", 143, "sparsezip: terminated")])
def test_a_signal_inside_a_constructor_still_ends_in_one_line(raised, code, message):
    """A signal that lands inside a constructor leaves a half-built object whose __del__ fails (tqdm's did); its
    traceback must not follow the one-line message."""
    script = f"""
import argparse, sys
from sparsezip import cli

class HalfBuilt:
    def __del__(self):
        raise AttributeError("half built")

def command(ns):
    half = HalfBuilt()
    raise {raised}

class Parser:
    def parse_args(self, argv):
        return argparse.Namespace(func=command, quiet=True)

cli.build_parser = Parser
sys.exit(cli.main([]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert result.returncode == code and result.stderr == message + "\n", result.stderr


@pytest.mark.parametrize("command", ["run", "inspect"])
@pytest.mark.parametrize("change, expected", [
    ({"format": "W16A16S"}, "quantization_config says format 'W16A16S', but the folder holds a W16A16SC model"),
    ({"tp_size": 3}, "quantization_config says tp_size 3, but the folder has 1 part folder"),
    ({"version": "2.0.0"}, "is format version 2.0.0"),
], ids=["format", "tp-size", "version"])
def test_a_config_json_that_contradicts_the_folder(capsys, command, change, expected, pipe, text_file, tmp_path):
    """What transformers and vLLM read must say what the folder holds."""
    folder = clone(pipe.packed, tmp_path / "c")
    edit_json(folder / "config.json", lambda d: d["quantization_config"].update(change))
    line = refused(capsys, commands_on(folder, text_file, tmp_path / "out")[command], watch=(folder,))
    assert expected in line
