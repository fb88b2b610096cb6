"""The Triton decoder of the `exp` value codec (docs/FORMAT.md 1.1): one GPU program per
4096-element tile, as the raw decoder (triton_decompress.py), with the values rebuilt in registers.

Each program finds the slot of every set bit (same prefix sums as the raw kernel), reads the
value's code bits from the bit planes and its sign+mantissa bytes, ranks the tile's escapes with
one more prefix sum (so the i-th escape code takes escapes[escidx[k] + i]) and assembles the bit
pattern: exponent = bases[k] + code, or the escape. `tile_values` is that per-tile value step
alone, for kernels that compute from the compressed form (fused GEMV).

Every load is masked to its part's bounds (values < nnz, escapes < n_escapes), so corrupt codec
data decodes to garbage but never reads out of bounds; `decode_and_validate` flags tiles that
break the codec's rules (base, escape count, escaped exponent) or rule 6, in the same pass."""

from __future__ import annotations

import functools

import torch

from ..errors import FormatError
from ..format import spec
from ..format.codecs import exp as X
from ..format.codecs import get_codec
from ..format.tensor import EndorTensor
from . import triton_decompress
from .triton_common import build, language, on_device, require_runnable

tl = None  # triton.language, bound by _kernel() on first use


def tile_values(signmant_ptr, codes_ptr, escapes_ptr, vi, take, tbase, efirst, n_escapes,
                E_BITS: tl.constexpr, M_BITS: tl.constexpr, N_BYTES: tl.constexpr,
                PLANES: tl.constexpr):
    """Bit patterns (int32) of one tile's values `vi` (int64 indices, a 2-D block in element
    order, e.g. [512, 8]) where `take`; tbase = bases[k], efirst = escidx[k]. Returns (bits,
    escape flags, escaped exponents)."""
    vi_safe = tl.where(take, vi, 0)
    g = vi_safe >> 6
    j = (vi_safe & 63).to(tl.int32)
    q = tl.zeros(vi.shape, dtype=tl.int32)
    for p in tl.static_range(PLANES):
        byte = tl.load(codes_ptr + (g * PLANES + p) * 8 + (j >> 3), mask=take, other=0)
        q = q | (((byte.to(tl.int32) >> (j & 7)) & 1) << p)
    code = q & 7
    is_esc = take & (code == 7)
    esc = is_esc.to(tl.int32)
    per_row = tl.sum(esc, axis=1)  # rank of each escape among the tile's, in element order
    rank = (tl.cumsum(per_row, axis=0) - per_row)[:, None] + tl.cumsum(esc, axis=1) - 1
    eidx = efirst + rank
    eok = is_esc & (eidx >= 0) & (eidx < n_escapes)
    esc_e = tl.load(escapes_ptr + eidx, mask=eok, other=0).to(tl.int32)
    expo = tl.where(is_esc, esc_e, tbase + code)
    r = tl.zeros(vi.shape, dtype=tl.int32)
    for b in tl.static_range(N_BYTES):
        sm = tl.load(signmant_ptr + vi_safe * N_BYTES + b, mask=take, other=0)
        r = r | (sm.to(tl.int32) << (8 * b))
    r = r | ((q >> 3) << (8 * N_BYTES))
    bits = ((r >> M_BITS) << (E_BITS + M_BITS)) | (expo << M_BITS) | (r & ((1 << M_BITS) - 1))
    return tl.where(take, bits, 0), is_esc, esc_e


def _exp_kernel(bitmap_ptr, signmant_ptr, codes_ptr, bases_ptr, escidx_ptr, escapes_ptr,
                tiles_ptr, out_ptr, flags_ptr, numel, nnz, n_escapes, tile_begin,
                E_BITS: tl.constexpr, M_BITS: tl.constexpr, N_BYTES: tl.constexpr,
                PLANES: tl.constexpr, MASKED: tl.constexpr, CHECK: tl.constexpr):
    rows = tl.arange(0, 512)
    cols = tl.arange(0, 8)
    local = rows[:, None] * 8 + cols[None, :]
    tile64 = (tile_begin + tl.program_id(0)).to(tl.int64)
    if MASKED:
        remaining = (numel - tile64 * 4096).to(tl.int32)
        raw = tl.load(bitmap_ptr + tile64 * 512 + rows, mask=rows * 8 < remaining,
                      other=0).to(tl.int32)
        byte = raw & ((1 << tl.minimum(tl.maximum(remaining - rows * 8, 0), 8)) - 1)
    else:
        byte = tl.load(bitmap_ptr + tile64 * 512 + rows).to(tl.int32)
    bits = (byte[:, None] >> cols[None, :]) & 1
    byte_count = byte - ((byte >> 1) & 0x55)
    byte_count = (byte_count & 0x33) + ((byte_count >> 2) & 0x33)
    byte_count = (byte_count + (byte_count >> 4)) & 0x0F
    slot = (tl.cumsum(byte_count, axis=0) - byte_count - 1)[:, None] + tl.cumsum(bits, axis=1)
    first = tl.load(tiles_ptr + tile64)
    base = tl.minimum(tl.maximum(first, 0), nnz)
    hi = tl.minimum(nnz - base, 4096).to(tl.int32)
    take = (bits != 0) & (slot < hi)
    tbase = tl.load(bases_ptr + tile64).to(tl.int32)
    efirst = tl.load(escidx_ptr + tile64)
    value, is_esc, esc_e = tile_values(signmant_ptr, codes_ptr, escapes_ptr, base + slot, take,
                                       tbase, efirst, n_escapes, E_BITS, M_BITS, N_BYTES, PLANES)
    dense = value.to(out_ptr.dtype.element_ty)
    if MASKED:
        tl.store(out_ptr + tile64 * 4096 + local, dense, mask=local < remaining)
    else:
        tl.store(out_ptr + tile64 * 4096 + local, dense)
    if CHECK:
        count = tl.sum(byte_count, axis=0)
        bad = count != tl.load(tiles_ptr + tile64 + 1) - first
        if MASKED:
            bad = bad | (tl.sum(raw ^ byte, axis=0) != 0)
        bad = bad | (tbase > (1 << E_BITS) - 7)
        escapes_here = tl.sum(tl.sum(is_esc.to(tl.int32), axis=1), axis=0)
        bad = bad | (escapes_here != tl.load(escidx_ptr + tile64 + 1) - efirst)
        bad = bad | (tl.sum(tl.sum((esc_e >> E_BITS).to(tl.int32), axis=1), axis=0) != 0)
        tl.store(flags_ptr + tile64, bad.to(tl.uint8))


_TILE_VALUES_PY = tile_values


@functools.cache
def _kernel(interpret: bool):
    """The kernel, interpreted or compiled; compiled, `tile_values` becomes a JIT function
    (the interpreter calls the plain Python one)."""
    global tl, tile_values
    tl = language()
    if not interpret:
        tile_values = build(_TILE_VALUES_PY, interpret)
    return build(_exp_kernel, interpret)


def _check_layout(et: EndorTensor, out: torch.Tensor) -> dict:
    """Shapes, dtypes and devices of every part (metadata only: no host sync)."""
    if et.dtype not in X.LAYOUT:
        raise FormatError(f"dtype {et.dtype} is not one of {', '.join(spec.DTYPES)}")
    numel = et.numel
    want = {"bitmap": ("U8", [spec.bitmap_bytes(numel)]),
            "tiles": ("I64", [spec.num_tiles(numel) + 1]),
            **get_codec("exp").parts(et.shape, et.dtype, et.nnz, et.codec_params)}
    parts = {"bitmap": et.bitmap, "tiles": et.tiles, **et.codec_parts}
    for name, (st_dtype, shape) in want.items():
        t = parts.get(name)
        dtype = torch.int64 if st_dtype == "I64" else torch.uint8
        if t is None or t.dtype != dtype or list(t.shape) != shape:
            raise FormatError(f"part {name!r} is "
                              f"{'missing' if t is None else f'{t.dtype}{list(t.shape)}'}, "
                              f"expected {dtype}{shape}")
        if t.device != out.device:
            raise ValueError(f"{name} is on {t.device} but out is on {out.device}; move the "
                             "EndorTensor first (et.to(device))")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if out.dtype != et.dtype or out.numel() != numel or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {et.dtype}[{numel}], got "
                         f"{out.dtype}{list(out.shape)}")
    require_runnable(out.device)
    return parts


def _launch(et: EndorTensor, out: torch.Tensor, flags: torch.Tensor | None, num_warps: int):
    parts = _check_layout(et, out)
    numel = et.numel
    if numel == 0:
        return
    e_bits, m_bits, n_bytes, _ = X.LAYOUT[et.dtype]
    kernel = _kernel(out.device.type != "cuda")
    args = (parts["bitmap"], parts[X.SIGNMANT], parts[X.CODES], parts[X.BASES],
            parts[X.ESCIDX], parts[X.ESCAPES], parts["tiles"],
            out.view(spec.INT_VIEW[et.dtype]), parts["bitmap"] if flags is None else flags,
            numel, et.nnz, et.codec_params["escapes"])
    consts = dict(E_BITS=e_bits, M_BITS=m_bits, N_BYTES=n_bytes, PLANES=X.planes(et.dtype),
                  CHECK=flags is not None, num_warps=num_warps)
    full_tiles = numel // spec.TILE_SIZE
    total_tiles = spec.num_tiles(numel)
    with on_device(out.device):
        if full_tiles:
            kernel[(full_tiles,)](*args, 0, MASKED=False, **consts)
        if total_tiles > full_tiles:
            kernel[(1,)](*args, full_tiles, MASKED=True, **consts)


def decode(et: EndorTensor, out: torch.Tensor, *,
           num_warps: int = triton_decompress.DEFAULT_NUM_WARPS) -> None:
    """Fill `out` with the dense tensor of an exp-coded `et`; codec data is trusted (loads are
    clamped): use `decode_and_validate` for data read from a file."""
    _launch(et, out, None, num_warps)


def decode_and_validate(et: EndorTensor, out: torch.Tensor, *,
                        num_warps: int = triton_decompress.DEFAULT_NUM_WARPS) -> torch.Tensor:
    """`decode` plus rule 6 and the exp rules checked per tile in the same pass: a 0-dim bool
    on the device, True iff every tile passed and both indexes run from 0 to their totals."""
    flags = torch.empty(spec.num_tiles(et.numel), dtype=torch.uint8, device=out.device)
    _launch(et, out, flags, num_warps)
    escidx = et.codec_parts[X.ESCIDX]
    ok = ((et.tiles[0] == 0) & (et.tiles[-1] == et.nnz) & (escidx[0] == 0)
          & (escidx[-1] == et.codec_params["escapes"]))
    return ok & ~flags.bool().any() if flags.numel() else ok
