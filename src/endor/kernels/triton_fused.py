"""The Triton fused linear (linear backend "triton"): y = x @ W.T from W's bitmap and values.

One GPU program per 4096-element tile, as the decoder (triton_decompress.py): the tile's bitmap
becomes slots in its packed values by a prefix sum, the values are gathered into registers (never
stored), widened to float32, multiplied with the x columns they meet and summed per output row.
A tile is flat row-major, so it covers the end of one row, whole rows and the start of another:
* K >= 4096 (every projection of an LLM): a tile touches at most two rows; the program sums its
  two segments and adds each to y with one float32 atomic per x row.
* smaller K: one atomic per non-zero weight (small matrices only: correct, not fast).
Atomics make the float32 sum order vary run to run; the bound of kernels/fused.py holds for any
order. Every values load is clamped to [0, nnz), whatever the tile index says (rule 6 is the
loader's to check: validate_tiles in triton_decompress.py).

CUDA tensors run the compiled kernel; CPU tensors run it under Triton's interpreter (tests),
which needs TRITON_INTERPRET=1. Triton is imported on first use."""

from __future__ import annotations

import functools

import torch

from ..errors import FormatError
from ..format import spec
from ..format.tensor import EndorTensor
from .triton_common import available, build, language, on_device, require_runnable

tl = None  # triton.language, bound by _kernel() on first use


def _linear_kernel(bitmap_ptr, values_ptr, tiles_ptr, x_ptr, y_ptr, numel, nnz, rows, cols,
                   batch, x_stride, TWO_ROWS: tl.constexpr):
    byte_index = tl.arange(0, 512)
    bit_index = tl.arange(0, 8)
    local = byte_index[:, None] * 8 + bit_index[None, :]
    tile64 = tl.program_id(0).to(tl.int64)
    remaining = (numel - tile64 * 4096).to(tl.int32)
    raw = tl.load(bitmap_ptr + tile64 * 512 + byte_index, mask=byte_index * 8 < remaining,
                  other=0).to(tl.int32)
    byte = raw & ((1 << tl.minimum(tl.maximum(remaining - byte_index * 8, 0), 8)) - 1)
    bits = (byte[:, None] >> bit_index[None, :]) & 1
    byte_count = byte - ((byte >> 1) & 0x55)
    byte_count = (byte_count & 0x33) + ((byte_count >> 2) & 0x33)
    byte_count = (byte_count + (byte_count >> 4)) & 0x0F
    slot = (tl.cumsum(byte_count, axis=0) - byte_count - 1)[:, None] + tl.cumsum(bits, axis=1)
    base = tl.minimum(tl.maximum(tl.load(tiles_ptr + tile64), 0), nnz)
    hi = tl.minimum(nnz - base, 4096).to(tl.int32)
    take = (bits != 0) & (slot < hi)
    w = tl.load(values_ptr + base + slot, mask=take, other=0).to(tl.float32)
    valid = local < remaining
    flat = tile64 * 4096 + local
    row = flat // cols
    col = flat % cols
    first_row = (tile64 * 4096) // cols
    for m in range(0, batch):
        xv = tl.load(x_ptr + m * x_stride + col, mask=valid, other=0.0).to(tl.float32)
        prod = w * xv
        if TWO_ROWS:
            first = row == first_row
            s0 = tl.sum(tl.sum(tl.where(first & valid, prod, 0.0), axis=1), axis=0)
            s1 = tl.sum(tl.sum(tl.where(first | (~valid), 0.0, prod), axis=1), axis=0)
            tl.atomic_add(y_ptr + m * rows + first_row, s0)
            tl.atomic_add(y_ptr + m * rows + first_row + 1, s1, mask=first_row + 1 < rows)
        else:
            tl.atomic_add(y_ptr + m * rows + row, prod, mask=valid)


@functools.cache
def _kernel(interpret: bool):
    global tl
    tl = language()
    return build(_linear_kernel, interpret)


def _check_parts(et: EndorTensor, x: torch.Tensor) -> None:
    """Shapes, dtypes and devices only (metadata: no host sync)."""
    numel = et.numel
    expected = {"bitmap": (et.bitmap, torch.uint8, spec.bitmap_bytes(numel)),
                "tiles": (et.tiles, torch.int64, spec.num_tiles(numel) + 1),
                "values": (et.values, et.dtype, et.values.numel())}
    for part, (t, dtype, length) in expected.items():
        if t.dtype != dtype or t.dim() != 1 or t.numel() != length:
            raise FormatError(f"{part} is {t.dtype}{list(t.shape)}, expected {dtype}[{length}]")
        if t.device != x.device:
            raise ValueError(f"{part} is on {t.device} but x is on {x.device}")
        if not t.is_contiguous():
            raise ValueError(f"{part} must be contiguous")
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != et.shape[1] or \
            x.stride(1) != 1:
        raise ValueError(f"x must be float32 [M, {et.shape[1]}] with contiguous rows, got "
                         f"{x.dtype}{list(x.shape)}")
    require_runnable(x.device)


def matmul(x: torch.Tensor, et: EndorTensor, *, num_warps: int = 4) -> torch.Tensor:
    """x [M, K] float32 contiguous on et's device -> float32 [M, N] = x @ W.T."""
    n, k = et.shape
    if et.values_codec != "raw":
        raise ValueError(f"the fused triton kernel reads raw values, not the {et.values_codec!r} "
                         "codec; use endor.kernels.linear (it decompresses those)")
    _check_parts(et, x)
    y = torch.zeros(x.shape[0], n, dtype=torch.float32, device=x.device)
    if et.numel == 0 or x.shape[0] == 0:
        return y
    kernel = _kernel(x.device.type != "cuda")
    with on_device(x.device):
        kernel[(spec.num_tiles(et.numel),)](
            et.bitmap, et.values, et.tiles, x, y, et.numel, et.nnz, n, k, x.shape[0],
            x.stride(0), TWO_ROWS=k >= spec.TILE_SIZE, num_warps=num_warps)
    return y


def _register() -> None:
    from .fused import LinearBackend, register_linear
    register_linear(LinearBackend("triton", ("cuda", "cpu"), matmul, available))


_register()
