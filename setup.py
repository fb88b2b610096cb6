"""Builds the CPU decompressor extension (plain C, AVX2/AVX-512 paths chosen at run time)."""

from pathlib import Path

from setuptools import Extension, setup

SOURCE = Path("src/endor/kernels/cpu/decompress.c")

ext_modules = []
if SOURCE.exists():
    ext_modules.append(Extension(
        "endor.kernels.cpu._decompress",
        sources=[str(SOURCE)],
        extra_compile_args=["-O3", "-std=c11", "-fno-strict-aliasing"],
        optional=True,  # without a compiler, the reference decompressor still works
    ))

setup(ext_modules=ext_modules)
