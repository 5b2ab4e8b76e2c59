"""Builds the optional native CPU kernels (sparsezip.kernels.cpu._native); the project metadata lives in pyproject.toml.

One extension from several C files that share kernels/cpu/native/spz.h: one CPU-feature detection, one thread pool.
Portable C compiled with -O3; SIMD variants are compiled in through function target attributes and chosen at run
time, so one build runs on every x86-64 CPU. The extension is optional: without a C compiler the install still
succeeds and sparsezip uses its numpy/torch paths.
"""

from pathlib import Path

from setuptools import Extension, setup

NATIVE = Path("src/sparsezip/kernels/cpu/native")

setup(
    ext_modules=[
        Extension(
            "sparsezip.kernels.cpu._native",
            sources=sorted(str(p) for p in NATIVE.glob("*.c")),
            depends=[str(NATIVE / "spz.h")],
            # no FMA contraction: the summation order is part of the kernels' contract (spz.h)
            extra_compile_args=["-O3", "-std=gnu11", "-pthread", "-ffp-contract=off"],
            extra_link_args=["-pthread"],
            optional=True,
        ),
    ]
)
