"""Builds the CPU extensions (plain C, AVX2/AVX-512 paths chosen at run time): the
decompressor and the fused linear."""

from pathlib import Path

from setuptools import Extension, setup

BASE_FLAGS = ["-O3", "-std=c11", "-fno-strict-aliasing"]
SOURCES = {
    "endor.kernels.cpu._decompress": (Path("src/endor/kernels/cpu/decompress.c"), []),
    # quant_values.c (included) rounds float16 as quant.c does: no FMA contraction either
    "endor.kernels.cpu._fused": (Path("src/endor/kernels/cpu/fused.c"), ["-ffp-contract=off"]),
    # no FMA contraction: quant.c's float16 rounding relies on separately rounded steps
    "endor.kernels.cpu._quant": (Path("src/endor/kernels/cpu/quant.c"), ["-ffp-contract=off"]),
}

# Included by the sources: an edit to one rebuilds the extensions that include it.
COMMON = Path("src/endor/kernels/cpu/common.h")
EXP = [Path("src/endor/kernels/cpu/exp_parts.h"), Path("src/endor/kernels/cpu/exp_values.c")]
DEPENDS = {"endor.kernels.cpu._decompress": [COMMON, *EXP],
           "endor.kernels.cpu._fused": [COMMON, *EXP, Path("src/endor/kernels/cpu/quant_values.c"),
                                        Path("src/endor/kernels/cpu/float_bits.h")],
           "endor.kernels.cpu._quant": [COMMON, Path("src/endor/kernels/cpu/float_bits.h")]}

ext_modules = [
    Extension(
        name,
        sources=[str(source)],
        depends=[str(p) for p in DEPENDS[name]],
        extra_compile_args=BASE_FLAGS + flags,
        optional=True,  # without a compiler, the reference decompressor and linear still work
    )
    for name, (source, flags) in SOURCES.items() if source.exists()
]

setup(ext_modules=ext_modules)
