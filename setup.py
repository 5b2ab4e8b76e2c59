"""Builds the optional native codec (sparsezip.kernels._cpucodec); the project metadata lives in pyproject.toml.

The extension is portable C compiled with -O3 (SIMD variants are picked at run time inside it), and it is
optional: if no C compiler is available the install still succeeds and sparsezip uses its numpy codec.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "sparsezip.kernels._cpucodec",
            sources=["src/sparsezip/kernels/_cpucodec.c"],
            extra_compile_args=["-O3", "-std=gnu11", "-pthread"],
            extra_link_args=["-pthread"],
            optional=True,
        ),
        Extension(  # fp16-weight matrix-vector products for CPU decode steps (sparsezip.kernels.cpu_linear)
            "sparsezip.kernels._cpugemv",
            sources=["src/sparsezip/kernels/_cpugemv.c"],
            # no FMA contraction: the summation order is part of the kernel's contract (see the file)
            extra_compile_args=["-O3", "-std=gnu11", "-pthread", "-ffp-contract=off"],
            extra_link_args=["-pthread"],
            optional=True,
        ),
        Extension(  # SparseGPT's per-column OBS loop (sparsezip.kernels.cpu_prune)
            "sparsezip.kernels._cpuprune",
            sources=["src/sparsezip/kernels/_cpuprune.c"],
            extra_compile_args=["-O3", "-std=gnu11", "-pthread"],
            extra_link_args=["-pthread"],
            optional=True,
        ),
    ]
)
