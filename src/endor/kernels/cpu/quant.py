"""The CPU decoder of the int8/int4 value codecs: a plain C extension (quant.c) that dequantizes
straight into the float32/float16/bfloat16 output, scalar / AVX2 / AVX-512 chosen at run time
(the same `isa=` argument and ENDOR_CPU_ISA variable as the raw decoder)."""

from __future__ import annotations

import torch

from ...errors import FormatError
from ...format import spec
from ...format.codecs import get_codec
from ...format.codecs.quant import QVALUES, SCALES, grid
from ...format.tensor import EndorTensor

try:
    from . import _quant
except ImportError:  # built with optional=True: no compiler, no extension
    _quant = None

CODECS = ("int8", "int4")
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def available() -> bool:
    return _quant is not None


def _check_parts(et: EndorTensor, out: torch.Tensor) -> None:
    """Sizes, dtypes, layout and rules Q2/Q3: the C code trusts them."""
    codec = get_codec(et.values_codec)
    n = et.numel
    for name, t, dtype, count in (("bitmap", et.bitmap, torch.uint8, spec.bitmap_bytes(n)),
                                  ("tiles", et.tiles, torch.int64, spec.num_tiles(n) + 1)):
        if t.dtype != dtype or t.dim() != 1 or t.numel() != count:
            raise FormatError(f"{name} is {t.dtype}{list(t.shape)}, expected {dtype}[{count}]")
    if not 0 <= et.nnz <= n:
        raise FormatError(f"nnz {et.nnz} is outside [0, {n}]")
    codec.check_parts(et.codec_params, et.codec_parts, et.shape, et.dtype, et.nnz)
    for t in (et.bitmap, et.tiles, *et.codec_parts.values()):
        if t.device.type != "cpu":
            raise ValueError(f"the cpu decoder needs every part on the cpu, not {t.device}")
    if out.dtype != et.dtype or out.numel() != n or out.device.type != "cpu" \
            or not out.is_contiguous():
        raise ValueError(f"out is {out.dtype}[{out.numel()}] on {out.device}; expected a "
                         f"contiguous {et.dtype}[{n}] on cpu")


def decode(et: EndorTensor, out: torch.Tensor, *, isa: str | None = None,
           threads: int | None = None) -> None:
    """Fill `out` with the dequantized dense tensor, bit-exact with the reference decoder."""
    from . import _choose_isa, _default_threads, _raise_for
    if _quant is None:
        raise RuntimeError("the cpu int8/int4 decoder extension is not built; reinstall endor "
                           "with a C compiler (pip install -e .) or use backend='reference'")
    if et.values_codec not in CODECS:
        raise ValueError(f"this decoder handles {CODECS}, not {et.values_codec!r}")
    _check_parts(et, out)
    code = _choose_isa(isa)
    while code and not _quant.supported() >> code & 1:  # e.g. AVX-512 without VL
        code -= 1
    if threads is None:
        threads = _default_threads(et.numel)
    elif not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    _, cols = grid(et.shape)
    bitmap, tiles = et.bitmap.contiguous(), et.tiles.contiguous()
    qvalues = et.codec_parts[QVALUES].contiguous()
    scales = et.codec_parts[SCALES].contiguous()
    err, tile = _quant.decode(bitmap.data_ptr(), qvalues.data_ptr(), scales.data_ptr(),
                              tiles.data_ptr(), out.data_ptr(), et.numel, et.nnz, cols,
                              et.codec_params["group_size"],
                              8 if et.values_codec == "int8" else 4, _DTYPE_CODES[et.dtype],
                              code, threads)
    if err:
        _raise_for(err, tile, et)
