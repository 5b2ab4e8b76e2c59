"""Weight layouts: how the pruned linears of a loaded model are held in memory and multiplied.

One class per layout (base.WeightLayout: build from what the folder stores, forward, resident bytes, which
folders, devices and compute dtypes it serves). This registry is the one list of them: it feeds the CLI's
`--weights` choices and help, the loader's validation and the choice of a class per device. Adding a layout is
one file in this package plus one line below. Importing this module costs nothing (no torch): the classes are
imported when a model is loaded.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class LayoutSpec:
    name: str  # the --weights value
    summary: str  # one sentence for --help
    classes: tuple[str, ...]  # "module:Class" in this package, best first; the first that serves the device wins


LAYOUTS = (
    LayoutSpec("dense", "fp16 matrices, decoded once at load (any folder; fastest prefill)",
               ("dense:DenseLinear",)),
    LayoutSpec("sparse", "bitmap + nonzero values (one byte each after L2 rounding), expanded inside each product "
               "(W16A16S/W16A16SC on CPU; about half the memory of dense)", ("sparse:SparseLinear",)),
    LayoutSpec("compressed", "the stored codec bytes, decoded on the fly (W16A16SC; least memory; fused Triton "
               "kernels on CUDA)", ("triton_fused:FusedCompressedLinear", "compressed:CompressedLinear")),
)


def names() -> tuple[str, ...]:
    return tuple(spec.name for spec in LAYOUTS)


def help_text() -> str:
    return "; ".join(f"{spec.name} = {spec.summary}" for spec in LAYOUTS)


def spec_named(name: str) -> LayoutSpec:
    from ..errors import SparsezipError

    for spec in LAYOUTS:
        if spec.name == name:
            return spec
    raise SparsezipError(f"unknown weights layout {name!r}; use one of {', '.join(names())}")


def classes(name: str) -> list[type]:
    """The layout classes registered for `name`, best first."""
    found = []
    for path in spec_named(name).classes:
        module, _, cls = path.partition(":")
        found.append(getattr(importlib.import_module(f".{module}", __name__), cls))
    return found
