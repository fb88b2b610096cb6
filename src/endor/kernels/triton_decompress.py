"""The Triton decompressor (backend "triton"): one GPU program per 4096-element tile
(docs/FORMAT.md).

Each program loads its tile's 512 bitmap bytes, expands them to a [512, 8] block of bits (row r
= bitmap byte r = elements 8r..8r+7), turns the bits into slots in the packed values with an
exclusive prefix sum (within each byte, then across the 512 byte counts), gathers the values
through an integer view (int16 for float16/bfloat16, int32 for float32: bit patterns move, so NaN
payloads and -0.0 survive) and stores the dense tile, zeros elsewhere.

Why this shape, for an H200:
* A row of the block is one bitmap byte, so each thread owns 8 consecutive outputs: one 16-byte
  store for a 2-byte dtype (two for float32), the widest store the GPU has. The bitmap is 1/25
  of the traffic at 50% sparsity (512 of ~12.8 KB per bf16 tile); Triton already loads it as
  one 32-bit word per thread (4 rows), coalesced, so no hand-packing into wider words is needed.
* The values of a tile are one contiguous run of at most 8 KB; a warp's gather touches one or two
  32-byte sectors per instruction and repeats hit L1, so the gather reads each value byte from
  HBM once.
* Every load of `values` is masked to [0, nnz): a crafted file whose popcounts disagree with the
  tile index (FORMAT.md rule 6, which the checksum alone cannot catch) decompresses to garbage but
  never reads out of bounds. `decompress_and_validate` reports such tiles from the same pass.
* One tile per program and 4 warps. A tile needs two dependent memory round trips (bitmap, then
  values), so bandwidth comes from many tiles in flight per SM. Compiled offline for sm_90a
  (ptxas 13.4), the full-tile bf16 kernel takes 48 registers and ~512 SASS instructions per
  thread, i.e. ~2050 warp instructions per tile: 10 programs fit per SM, and 132 SMs x 4
  schedulers could issue ~6.5 TB/s worth of tiles, so neither occupancy nor issue caps it below
  HBM. 8 warps: 32 registers but ~2600 warp instructions per tile (the scan's cross-warp
  steps grow); 2 warps: 80 registers, fewer programs per SM. 4096x14336 gives 14336 programs,
  ~11 per resident slot, so the tail is short. Several tiles per program only amortise two
  scalar loads; `tiles_per_program` and `num_warps` are arguments so a device check can sweep
  them. Target: >= 60% of HBM bandwidth (bytes read + written) on 4096x14336 bf16 at 50%
  sparsity; not measured here (no GPU on the development machine), see scripts/device-check.sh.
* Full tiles run without any bitmap or output mask (vectorised loads and stores); a last partial
  tile gets its own one-program launch with masks, so the hot kernel carries none.

CUDA tensors always run the compiled kernel. CPU tensors run the same kernel under Triton's
interpreter, which is how it is tested without a GPU; that needs TRITON_INTERPRET=1, as Triton's
own convention asks. Triton is imported on first use: `import endor` imports no triton and
compiles nothing."""

from __future__ import annotations

import functools

import torch

from ..errors import FormatError
from ..format import spec
from ..format.decompress import Backend, register
from ..format.tensor import EndorTensor
from .triton_common import available, build, language, on_device, require_runnable

TILE_BYTES = spec.TILE_BITMAP_BYTES
DEFAULT_NUM_WARPS = 4
DEFAULT_TILES_PER_PROGRAM = 1

tl = None  # triton.language, bound by _kernel() on first use (the kernel reads it as a global)


def _decompress_kernel(bitmap_ptr, values_ptr, tiles_ptr, out_ptr, flags_ptr, numel, nnz,
                   tile_begin, tile_end,
                   MASKED: tl.constexpr, CHECK: tl.constexpr, TILES_PER_PROGRAM: tl.constexpr):
    rows = tl.arange(0, 512)
    cols = tl.arange(0, 8)
    local = rows[:, None] * 8 + cols[None, :]  # element index inside the tile, int32 [512, 8]
    pid = tl.program_id(0)
    for i in tl.static_range(TILES_PER_PROGRAM):
        tile = tile_begin + pid * TILES_PER_PROGRAM + i
        if tile < tile_end:
            tile64 = tile.to(tl.int64)
            if MASKED:
                # The last, partial tile: only ceil(remaining / 8) bitmap bytes exist.
                remaining = (numel - tile64 * 4096).to(tl.int32)
                raw = tl.load(bitmap_ptr + tile64 * 512 + rows, mask=rows * 8 < remaining,
                              other=0).to(tl.int32)
                # Keep only bits of real elements; the dropped ones are checked below (CHECK).
                byte = raw & ((1 << tl.minimum(tl.maximum(remaining - rows * 8, 0), 8)) - 1)
            else:
                byte = tl.load(bitmap_ptr + tile64 * 512 + rows).to(tl.int32)
            bits = (byte[:, None] >> cols[None, :]) & 1
            # Popcount of each byte by SWAR arithmetic, not a sum over `bits`: it stays in the
            # thread that loaded the byte (a reduction would shuffle across a layout change).
            byte_count = byte - ((byte >> 1) & 0x55)
            byte_count = (byte_count & 0x33) + ((byte_count >> 2) & 0x33)
            byte_count = (byte_count + (byte_count >> 4)) & 0x0F
            # Slot of each set bit among the tile's values: set bits before its byte, plus set
            # bits up to and including it in the byte, minus one (meaningless where the bit is 0).
            slot = (tl.cumsum(byte_count, axis=0) - byte_count - 1)[:, None] \
                + tl.cumsum(bits, axis=1)
            first = tl.load(tiles_ptr + tile64)
            # Every values load stays inside [0, nnz), whatever the tile index says.
            base = tl.minimum(tl.maximum(first, 0), nnz)
            hi = tl.minimum(nnz - base, 4096).to(tl.int32)
            take = (bits != 0) & (slot < hi)
            dense = tl.load(values_ptr + base + slot, mask=take, other=0)
            if MASKED:
                tl.store(out_ptr + tile64 * 4096 + local, dense, mask=local < remaining)
            else:
                tl.store(out_ptr + tile64 * 4096 + local, dense)
            if CHECK:
                count = tl.sum(byte_count, axis=0)
                bad = count != tl.load(tiles_ptr + tile64 + 1) - first
                if MASKED:
                    bad = bad | (tl.sum(raw ^ byte, axis=0) != 0)  # padding bits must be zero
                tl.store(flags_ptr + tile64, bad.to(tl.uint8))


_QUANT_CODECS = ("int8", "int4")


@functools.cache
def _kernel(interpret: bool):
    global tl
    tl = language()
    return build(_decompress_kernel, interpret)


def _check_layout(et: EndorTensor, out: torch.Tensor) -> None:
    """Shapes, dtypes and devices only (metadata: no host sync)."""
    numel = et.numel
    if et.dtype not in spec.INT_VIEW:
        raise FormatError(f"dtype {et.dtype} is not one of {', '.join(spec.DTYPES)}")
    expected = {"bitmap": (et.bitmap, torch.uint8, spec.bitmap_bytes(numel)),
                "tiles": (et.tiles, torch.int64, spec.num_tiles(numel) + 1),
                "values": (et.values, et.dtype, et.values.numel())}
    for part, (t, dtype, length) in expected.items():
        if t.dtype != dtype or t.dim() != 1 or t.numel() != length:
            raise FormatError(f"{part} is {t.dtype}{list(t.shape)}, expected {dtype}[{length}]")
        if t.device != out.device:
            raise ValueError(f"{part} is on {t.device} but out is on {out.device}; move the "
                             "EndorTensor first (et.to(device))")
        if not t.is_contiguous():
            raise ValueError(f"{part} must be contiguous")
    if out.dtype != et.dtype or out.numel() != numel or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {et.dtype}[{numel}], got "
                         f"{out.dtype}{list(out.shape)}")
    require_runnable(out.device)


def _launch(et: EndorTensor, out: torch.Tensor, flags: torch.Tensor | None, num_warps: int,
            tiles_per_program: int) -> None:
    if num_warps not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"num_warps must be a power of two from 1 to 32, got {num_warps}")
    if not isinstance(tiles_per_program, int) or tiles_per_program < 1:
        raise ValueError(f"tiles_per_program must be a positive int, got {tiles_per_program!r}")
    _check_layout(et, out)
    numel = et.numel
    if numel == 0:
        return
    ints = spec.INT_VIEW[et.dtype]
    kernel = _kernel(out.device.type != "cuda")
    args = (et.bitmap, et.values.view(ints), et.tiles, out.view(ints),
            et.bitmap if flags is None else flags, numel, et.nnz)  # flags unused unless CHECK
    full_tiles = numel // spec.TILE_SIZE
    total_tiles = spec.num_tiles(numel)
    with on_device(out.device):
        if full_tiles:
            grid = (-(-full_tiles // tiles_per_program),)
            kernel[grid](*args, 0, full_tiles, MASKED=False, CHECK=flags is not None,
                         TILES_PER_PROGRAM=tiles_per_program, num_warps=num_warps)
        if total_tiles > full_tiles:
            kernel[(1,)](*args, full_tiles, total_tiles, MASKED=True, CHECK=flags is not None,
                         TILES_PER_PROGRAM=1, num_warps=num_warps)


def decompress(et: EndorTensor, out: torch.Tensor, *, num_warps: int = DEFAULT_NUM_WARPS,
           tiles_per_program: int = DEFAULT_TILES_PER_PROGRAM) -> None:
    """Fill `out` (flat, contiguous, et.dtype, on et.device) with the dense tensor. Enqueued on
    the current CUDA stream: no host sync, no allocation. Bitmap popcounts are trusted (FORMAT.md
    rule 6); call `validate_tiles` or use `decompress_and_validate` for data read from a file.
    Exp-coded tensors go to triton_exp (one tile per program), int8/int4 to triton_quant."""
    if et.values_codec == "exp":
        from . import triton_exp
        triton_exp.decode(et, out, num_warps=num_warps)
        return
    if et.values_codec in _QUANT_CODECS:
        from .triton_quant import decode as decode_quantized
        decode_quantized(et, out, num_warps=num_warps)
        return
    _launch(et, out, None, num_warps, tiles_per_program)


def decompress_and_validate(et: EndorTensor, out: torch.Tensor, *,
                        num_warps: int = DEFAULT_NUM_WARPS,
                        tiles_per_program: int = DEFAULT_TILES_PER_PROGRAM) -> torch.Tensor:
    """`decompress`, plus FORMAT.md rule 6 checked in the same pass: returns a 0-dim bool tensor on
    the device, True iff every tile's popcount equals its tile-index difference and no padding
    bit is set. Nothing waits for it; read it when the answer is needed (`bool(ok)` syncs)."""
    flags = torch.empty(spec.num_tiles(et.numel), dtype=torch.uint8, device=out.device)
    _launch(et, out, flags, num_warps, tiles_per_program)
    ok = _ends_consistent(et)
    return ok & ~flags.bool().any() if flags.numel() else ok


_POPCOUNT_LUT = torch.tensor([bin(b).count("1") for b in range(256)], dtype=torch.uint8)


@functools.cache
def _popcount_lut(device: torch.device) -> torch.Tensor:
    return _POPCOUNT_LUT.to(device)


def _ends_consistent(et: EndorTensor) -> torch.Tensor:
    """tiles[0] == 0 and tiles[-1] == nnz, as a 0-dim bool on the device."""
    return (et.tiles[0] == 0) & (et.tiles[-1] == et.nnz)


def validate_tiles(et: EndorTensor) -> torch.Tensor:
    """FORMAT.md rule 6 (and the ends of rule 5) in plain torch on et's device, without a host
    sync: a 0-dim bool tensor, True iff each tile's bitmap popcount (a 256-entry table lookup
    per byte, summed per 512-byte tile) equals tiles[k+1] - tiles[k], the index runs from 0 to
    nnz, and the bitmap bits past the last element are zero. Run it on a tensor read from a file
    before trusting `decompress`; it reads only the bitmap and the tile index (about 1 bit per
    element), never the values."""
    numel = et.numel
    if et.bitmap.dtype != torch.uint8 or et.bitmap.numel() != spec.bitmap_bytes(numel):
        raise FormatError(f"bitmap is {et.bitmap.dtype}{list(et.bitmap.shape)}, expected "
                          f"uint8[{spec.bitmap_bytes(numel)}]")
    tiles = spec.num_tiles(numel)
    if et.tiles.dtype != torch.int64 or et.tiles.numel() != tiles + 1:
        raise FormatError(f"tiles is {et.tiles.dtype}{list(et.tiles.shape)}, expected "
                          f"int64[{tiles + 1}]")
    ok = _ends_consistent(et)
    if numel == 0:
        return ok
    lut = _popcount_lut(et.bitmap.device)
    per_byte = torch.index_select(lut, 0, et.bitmap.int())
    per_byte = torch.nn.functional.pad(per_byte, (0, tiles * TILE_BYTES - per_byte.numel()))
    counts = per_byte.view(tiles, TILE_BYTES).sum(dim=1)
    ok = ok & (counts == et.tiles[1:] - et.tiles[:-1]).all()
    if numel % 8:
        ok = ok & ((et.bitmap[-1] >> (numel % 8)) == 0)
    return ok


register(Backend("triton", ("cuda", "cpu"), decompress, available,
                 codecs=("raw", "exp", *_QUANT_CODECS)))
