"""The fast CPU decompressor (backend "cpu"): a plain C extension (decompress.c) with scalar, AVX2
and AVX-512 paths chosen at run time, tiles split over threads with the GIL released.

The instruction-set path is, in order: the `isa=` argument, the ENDOR_CPU_ISA environment
variable (scalar | avx2 | avx512 | auto), the best one this CPU runs. Without the compiled
extension `available()` is False and the registry falls back to the reference decompressor."""

from __future__ import annotations

import os

import torch

from ...errors import FormatError
from ...format import spec
from ...format.codecs import exp as exp_codec
from ...format.codecs import get_codec
from ...format.decompress import Backend, register
from ...format.tensor import EndorTensor

try:
    from . import _decompress
except ImportError:  # built with optional=True: no compiler, no extension
    _decompress = None

ISAS = ("scalar", "avx2", "avx512")  # index = the extension's ISA code
ISA_ENV = "ENDOR_CPU_ISA"
# Below this many elements per thread, starting a thread costs more than it saves.
MIN_ELEMENTS_PER_THREAD = 1 << 20

_ERR_TILE_INDEX, _ERR_POPCOUNT, _ERR_PADDING, _ERR_ARGUMENT = 1, 2, 3, 4
_EXP_ERRORS = {5: "a tile's exponent base is too large for the dtype",
               6: "the escape index is invalid",
               7: "a tile's escape codes disagree with the escape index",
               8: "an escaped exponent is too large for the dtype"}
CODECS = ("raw", "exp")
_quant_codecs = ("int8", "int4")  # decoded by quant.c (cpu/quant.py)


def available() -> bool:
    return _decompress is not None


def isas_in(mask: int) -> tuple[str, ...]:
    """The paths an extension's `supported()` bit mask names, slowest first."""
    return tuple(name for code, name in enumerate(ISAS) if mask >> code & 1)


def supported_isas() -> tuple[str, ...]:
    """The paths this CPU runs, slowest first (empty without the extension)."""
    if _decompress is None:
        return ()
    return isas_in(_decompress.supported())


def choose_isa(isa: str | None, supported: tuple[str, ...], kind: str = "decompressor") -> int:
    """The ISA code to run: `isa`, else $ENDOR_CPU_ISA, else the best of `supported`; `kind`
    names the kernel in errors."""
    source = "isa"
    if isa is None:
        isa, source = os.environ.get(ISA_ENV, "") or "auto", ISA_ENV
    if isa == "auto":
        return ISAS.index(supported[-1])
    if isa not in ISAS:
        raise ValueError(f"{source}={isa!r} is not a CPU {kind} path; choose one of "
                         f"{', '.join(('auto', *ISAS))}")
    if isa not in supported:
        raise ValueError(f"{source}={isa!r}: this CPU runs only {', '.join(supported)}")
    return ISAS.index(isa)


def _choose_isa(isa: str | None) -> int:
    return choose_isa(isa, supported_isas())


def _default_threads(numel: int) -> int:
    return max(1, min(torch.get_num_threads(), numel // MIN_ELEMENTS_PER_THREAD))


def _check_parts(et: EndorTensor, out: torch.Tensor) -> None:
    """Sizes, dtypes and layout of every buffer: the C code trusts them."""
    n = et.numel
    expected = {
        "bitmap": (et.bitmap, torch.uint8, spec.bitmap_bytes(n)),
        "tiles": (et.tiles, torch.int64, spec.num_tiles(n) + 1),
    }
    if et.values_codec == "raw":
        expected["values"] = (et.values, et.dtype, et.values.numel())
    else:
        if et.values_codec not in CODECS or et.dtype not in spec.INT_VIEW:
            raise ValueError(f"the cpu decoder does not decode the {et.values_codec!r} codec")
        codec = get_codec(et.values_codec)
        for suffix, (st_dtype, shape) in codec.parts(et.shape, et.dtype, et.nnz,
                                                     et.codec_params).items():
            dtype = torch.int64 if st_dtype == "I64" else torch.uint8
            expected[suffix] = (et.codec_parts.get(suffix), dtype, shape[0])
    for name, (t, dtype, count) in expected.items():
        if t is None:
            raise FormatError(f"part {name!r} is missing")
        if t.dtype != dtype or t.dim() != 1 or t.numel() != count:
            raise FormatError(f"{name} is {t.dtype}{list(t.shape)}, expected {dtype}[{count}] "
                              f"for a {et.dtype} tensor of shape {list(et.shape)}")
        if t.device.type != "cpu":
            raise ValueError(f"the cpu decompressor needs {name} on the cpu, not {t.device}")
    if et.nnz > n:
        raise FormatError(f"values has {et.nnz} elements, more than the tensor's {n}")
    if et.dtype not in spec.INT_VIEW:
        raise FormatError(f"dtype {et.dtype} is not an Endor dtype ({', '.join(spec.DTYPES)})")
    if out.dtype != et.dtype or out.numel() != n or out.device.type != "cpu":
        raise ValueError(f"out is {out.dtype}[{out.numel()}] on {out.device}; expected "
                         f"{et.dtype}[{n}] on cpu")
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")


def _raise_for(code: int, tile: int, et: EndorTensor) -> None:
    if code in _EXP_ERRORS:
        raise FormatError(f"exp codec: {_EXP_ERRORS[code]} (tile {tile})")
    if code == _ERR_PADDING:
        raise FormatError("bitmap has bits set past the last element")
    if code in (_ERR_TILE_INDEX, _ERR_POPCOUNT):
        where = (f"tiles[0] = {int(et.tiles[0])}, tiles[-1] = {int(et.tiles[-1])}, values "
                 f"holds {et.nnz}")
        if 0 <= tile < spec.num_tiles(et.numel):
            start = tile * spec.TILE_SIZE
            end = min(start + spec.TILE_SIZE, et.numel)
            tile_bits = et.bitmap[start // 8: (end + 7) // 8].tolist()
            ones = sum(int(b).bit_count() for b in tile_bits)
            claimed = int(et.tiles[tile + 1]) - int(et.tiles[tile])
            where = (f"tile {tile} has {ones} bits set, tiles[{tile + 1}] - tiles[{tile}] = "
                     f"{claimed}; {where}")
        raise FormatError(f"bitmap popcounts disagree with the tile index (corrupt data): {where}")
    raise AssertionError(f"cpu decompressor returned error code {code}")  # arguments were checked


def decompress(et: EndorTensor, out: torch.Tensor, *, isa: str | None = None,
           threads: int | None = None, huge_pages: bool = True) -> None:
    """Fill `out` (contiguous, et.dtype, et.numel elements, on the cpu) with the dense tensor,
    bit-exact. `threads` defaults to one per 1M elements up to torch.get_num_threads().
    `huge_pages` asks the kernel for transparent huge pages on the output (Linux), which makes
    a freshly allocated output several times cheaper to fault in. On FormatError the contents
    of `out` are unspecified."""
    if et.values_codec in _quant_codecs:
        from .quant import decode as decode_quantized
        return decode_quantized(et, out, isa=isa, threads=threads)
    if _decompress is None:
        raise RuntimeError("the cpu decompressor extension is not built; reinstall endor with a C "
                           "compiler (pip install -e .) or use backend='reference'")
    _check_parts(et, out)
    code = _choose_isa(isa)
    if threads is None:
        threads = _default_threads(et.numel)
    elif not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    bitmap, tiles = et.bitmap.contiguous(), et.tiles.contiguous()
    if et.values_codec == "raw":
        values = et.values.contiguous()
        err, tile = _decompress.decompress(bitmap.data_ptr(), values.data_ptr(), values.numel(),
                                   tiles.data_ptr(), out.data_ptr(), et.numel, et.dtype.itemsize,
                                   code, threads, bool(huge_pages))
    else:
        parts = {k: v.contiguous() for k, v in et.codec_parts.items()}
        e_bits, m_bits, n_bytes, _ = exp_codec.LAYOUT[et.dtype]
        err, tile = _decompress.decompress(
            bitmap.data_ptr(), 0, et.nnz, tiles.data_ptr(), out.data_ptr(), et.numel,
            et.dtype.itemsize, code, threads, bool(huge_pages),
            *(parts[s].data_ptr() for s in (exp_codec.SIGNMANT, exp_codec.CODES,
                                            exp_codec.BASES, exp_codec.ESCIDX,
                                            exp_codec.ESCAPES)),
            parts[exp_codec.ESCAPES].numel(), e_bits, m_bits, n_bytes, exp_codec.planes(et.dtype))
    if err:
        _raise_for(err, tile, et)


register(Backend("cpu", ("cpu",), decompress, available, codecs=(*CODECS, *_quant_codecs)))
