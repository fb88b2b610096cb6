"""Builds the CPU decoder extension (plain C, AVX2/AVX-512 paths chosen at run time)."""

from pathlib import Path

from setuptools import Extension, setup

SOURCES = {"endor.kernels.cpu._decode": Path("src/endor/kernels/cpu/decode.c"),
           "endor.kernels.cpu._quant": Path("src/endor/kernels/cpu/quant.c")}

ext_modules = []
for name, source in SOURCES.items():
    if source.exists():
        ext_modules.append(Extension(
            name,
            sources=[str(source)],
            # no FMA contraction: quant.c's float16 rounding relies on separately rounded steps
            extra_compile_args=["-O3", "-std=c11", "-fno-strict-aliasing", "-ffp-contract=off"],
            optional=True,  # without a compiler, the reference decoder still works
        ))

setup(ext_modules=ext_modules)
