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
    auto_rank: dict[str, int]  # the layouts `auto` considers per device type, in this order: CUDA takes the first that
    # fits (dense, then compressed: on an H200 the fused kernels decoded at 0.35-0.68x cuBLAS, BENCHMARKS.md); on the
    # CPU `auto` times them on the machine (runtime.time_layouts) and the order only breaks ties


LAYOUTS = (
    LayoutSpec("dense", "fp16 matrices, decoded once at load (any folder; fastest prefill)",
               ("dense:DenseLinear",), {"cpu": 2, "cuda": 0}),
    LayoutSpec("sparse", "bitmap + nonzero values (one byte each after L2 rounding), expanded inside each product "
               "(W16A16S/W16A16SC on CPU; about half the memory of dense)", ("sparse:SparseLinear",),
               {"cpu": 0}),
    LayoutSpec("compressed", "the stored codec bytes, decoded on the fly (W16A16SC; least memory; fused Triton "
               "kernels on CUDA)", ("triton_fused:FusedCompressedLinear", "compressed:CompressedLinear"),
               {"cpu": 1, "cuda": 1}),
)
AUTO = "auto"  # the fastest layout that fits in memory for the folder and the machine (runtime.auto_layout)


def names() -> tuple[str, ...]:
    return (AUTO,) + tuple(spec.name for spec in LAYOUTS)


def help_text() -> str:
    return "; ".join([f"{AUTO} = the fastest of these that serves the folder and fits in memory (on the CPU timed "
                      "at load on this machine)"] +
                     [f"{spec.name} = {spec.summary}" for spec in LAYOUTS])


def auto_order(device_type: str) -> list[str]:
    """The layouts `auto` considers on a device type, fastest first."""
    ranked = [spec for spec in LAYOUTS if device_type in spec.auto_rank]
    return [spec.name for spec in sorted(ranked, key=lambda spec: spec.auto_rank[device_type])]


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
