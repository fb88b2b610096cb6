"""The Triton decoder of the int8/int4 value codecs (docs/FORMAT.md, section 1.6): one program
per 4096-element tile, laid out as triton_decompress.py's raw decoder (a [512, 8] block, row r =
bitmap byte r; slots of the set bits by prefix sums), then per element: the integer at its slot
(int4: the nibble of byte slot // 2), the scale of its group (row * groups_per_row + column // G,
from the element index alone), fl32(scale) * q, rounded once to the output dtype.

bfloat16 is rounded with integer arithmetic (u + 0x7fff + (u >> 16 & 1)) >> 16, the rule of the
reference (torch) and the CPU decoder, and read through int16 views, so the interpreter (numpy,
no bfloat16) runs the same code the GPU compiles. Every integer load is masked to the qvalues
buffer and every scale index is bounded by the tensor's shape, whatever the tile index says."""

from __future__ import annotations

import functools

import torch

from ..errors import FormatError
from ..format import spec
from ..format.codecs import get_codec
from ..format.codecs.quant import QVALUES, SCALES, grid, groups_per_row
from ..format.tensor import EndorTensor
from .triton_common import build, language, on_device, require_runnable

CODECS = ("int8", "int4")
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

tl = None  # triton.language, bound by _kernel() on first use


def _quant_kernel(bitmap_ptr, q_ptr, scales_ptr, tiles_ptr, out_ptr, numel, nnz, q_bytes,
                  cols, group_size, per_row, tile_begin, tile_end,
                  INT4: tl.constexpr, DTYPE: tl.constexpr, MASKED: tl.constexpr):
    rows = tl.arange(0, 512)
    lanes = tl.arange(0, 8)
    local = rows[:, None] * 8 + lanes[None, :]
    tile = tile_begin + tl.program_id(0)
    if tile < tile_end:
        tile64 = tile.to(tl.int64)
        if MASKED:
            remaining = (numel - tile64 * 4096).to(tl.int32)
            raw = tl.load(bitmap_ptr + tile64 * 512 + rows, mask=rows * 8 < remaining,
                          other=0).to(tl.int32)
            byte = raw & ((1 << tl.minimum(tl.maximum(remaining - rows * 8, 0), 8)) - 1)
        else:
            byte = tl.load(bitmap_ptr + tile64 * 512 + rows).to(tl.int32)
        bits = (byte[:, None] >> lanes[None, :]) & 1
        byte_count = byte - ((byte >> 1) & 0x55)
        byte_count = (byte_count & 0x33) + ((byte_count >> 2) & 0x33)
        byte_count = (byte_count + (byte_count >> 4)) & 0x0F
        slot = (tl.cumsum(byte_count, axis=0) - byte_count - 1)[:, None] + tl.cumsum(bits, axis=1)
        first = tl.load(tiles_ptr + tile64)
        base = tl.minimum(tl.maximum(first, 0), nnz)
        hi = tl.minimum(nnz - base, 4096).to(tl.int32)
        take = (bits != 0) & (slot < hi)
        index = base + slot  # integer index, int64
        if INT4:
            packed = tl.load(q_ptr + (index >> 1), mask=take & ((index >> 1) < q_bytes),
                             other=0).to(tl.int32)
            nibble = (packed >> ((index & 1) * 4).to(tl.int32)) & 0xF
            q = (nibble ^ 8) - 8
        else:
            q = tl.load(q_ptr + index, mask=take, other=0).to(tl.int32)
        element = tile64 * 4096 + local
        row = element // cols
        group = row * per_row + (element - row * cols) // group_size
        inside = local < remaining if MASKED else local >= 0
        if DTYPE == 2:  # bfloat16 scales through an int16 view
            s_bits = tl.load(scales_ptr + group, mask=inside, other=0).to(tl.uint16)
            scale = (s_bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        else:
            scale = tl.load(scales_ptr + group, mask=inside, other=0).to(tl.float32)
        value = tl.where(take, scale * q.to(tl.float32), 0.0)
        if DTYPE == 2:
            u = value.to(tl.uint32, bitcast=True)
            rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            result = rounded.to(tl.uint16).to(tl.int16, bitcast=True)
        elif DTYPE == 1:
            result = value.to(tl.float16)
        else:
            result = value
        if MASKED:
            tl.store(out_ptr + element, result, mask=inside)
        else:
            tl.store(out_ptr + element, result)


@functools.cache
def _kernel(interpret: bool):
    global tl
    tl = language()
    return build(_quant_kernel, interpret)


def _check_layout(et: EndorTensor, out: torch.Tensor) -> None:
    """Shapes, dtypes, devices (metadata only: no host sync, so rules Q2/Q3 are the loader's)."""
    n = et.numel
    codec = get_codec(et.values_codec)
    want = codec.parts(et.shape, et.dtype, et.nnz, et.codec_params)
    st_dtypes = {"I8": torch.int8, "U8": torch.uint8}
    expected = {"bitmap": (et.bitmap, torch.uint8, spec.bitmap_bytes(n)),
                "tiles": (et.tiles, torch.int64, spec.num_tiles(n) + 1),
                QVALUES: (et.codec_parts[QVALUES], st_dtypes[want[QVALUES][0]],
                          want[QVALUES][1][0]),
                SCALES: (et.codec_parts[SCALES], et.dtype, want[SCALES][1][0])}
    for part, (t, dtype, length) in expected.items():
        if t.dtype != dtype or t.dim() != 1 or t.numel() != length:
            raise FormatError(f"{part} is {t.dtype}{list(t.shape)}, expected {dtype}[{length}]")
        if t.device != out.device:
            raise ValueError(f"{part} is on {t.device} but out is on {out.device}; move the "
                             "EndorTensor first (et.to(device))")
        if not t.is_contiguous():
            raise ValueError(f"{part} must be contiguous")
    if out.dtype != et.dtype or out.numel() != n or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {et.dtype}[{n}], got "
                         f"{out.dtype}{list(out.shape)}")
    require_runnable(out.device)


def decode(et: EndorTensor, out: torch.Tensor, *, num_warps: int = 4) -> None:
    """Fill `out` (flat, contiguous, et.dtype, on et.device) with the dequantized tensor,
    enqueued on the current CUDA stream."""
    if et.values_codec not in CODECS:
        raise ValueError(f"this decoder handles {CODECS}, not {et.values_codec!r}")
    _check_layout(et, out)
    n = et.numel
    if n == 0:
        return
    _, cols = grid(et.shape)
    group_size = et.codec_params["group_size"]
    dtype_code = _DTYPE_CODES[et.dtype]
    scales = et.codec_parts[SCALES]
    qvalues = et.codec_parts[QVALUES]
    if et.dtype == torch.bfloat16:
        scales, out = scales.view(torch.int16), out.view(torch.int16)
    kernel = _kernel(out.device.type != "cuda")
    args = (et.bitmap, qvalues, scales, et.tiles, out, n, et.nnz, qvalues.numel(), cols,
            group_size, groups_per_row(cols, group_size))
    full = n // spec.TILE_SIZE
    total = spec.num_tiles(n)
    int4 = et.values_codec == "int4"
    with on_device(out.device):
        if full:
            kernel[(full,)](*args, 0, full, INT4=int4, DTYPE=dtype_code, MASKED=False,
                            num_warps=num_warps)
        if total > full:
            kernel[(1,)](*args, full, total, INT4=int4, DTYPE=dtype_code, MASKED=True,
                         num_warps=num_warps)
