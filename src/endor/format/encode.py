"""The encoder: dense tensor -> EndorTensor, bit-exact by construction.

CPU tensors are encoded with numpy, a chunk of tiles at a time (so the temporaries stay in cache
and memory does not grow with the tensor): `!= 0` on the integer view, `np.packbits` for the
bitmap, a popcount of each tile's 512 bitmap bytes for the tile index, `np.compress` for the
values. Tensors elsewhere use the vectorised torch functions `pack_bits` / `tile_offsets`, which
are also the reference the fast path is tested against."""

import numpy as np
import torch

from ..errors import FormatError
from . import spec
from .codecs import codec_names, get_codec
from .tensor import EndorTensor

DEFAULT_CODEC = "exp"  # docs/FORMAT.md 1.1; "raw" keeps every bit of every value

_BIT_WEIGHTS = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8)
# Elements per chunk of the CPU encoder: a whole number of tiles.
_CHUNK_ELEMENTS = 64 * spec.TILE_SIZE


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [n] -> uint8 [ceil(n/8)], bit i in byte i//8 at position i%8 (LSB first)."""
    n = mask.numel()
    padded = torch.zeros(spec.bitmap_bytes(n) * 8, dtype=torch.uint8, device=mask.device)
    padded[:n] = mask
    weights = _BIT_WEIGHTS.to(mask.device)
    return (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def tile_offsets(mask: torch.Tensor) -> torch.Tensor:
    """bool [n] -> int64 [num_tiles + 1]: non-zeros before each tile, then nnz."""
    n = mask.numel()
    tiles = spec.num_tiles(n)
    padded = torch.zeros(tiles * spec.TILE_SIZE, dtype=torch.int32, device=mask.device)
    padded[:n] = mask
    counts = padded.view(tiles, spec.TILE_SIZE).sum(dim=1, dtype=torch.int64)
    return torch.cat([torch.zeros(1, dtype=torch.int64, device=mask.device), counts.cumsum(0)])


def _tile_counts(bitmap: np.ndarray, numel: int) -> np.ndarray:
    """int64 [num_tiles]: set bits of each tile's bitmap bytes (bits past `numel` are zero)."""
    tiles = spec.num_tiles(numel)
    padded = np.zeros(tiles * spec.TILE_BITMAP_BYTES, dtype=np.uint8)
    padded[:bitmap.size] = bitmap
    words = padded.view(np.uint64).reshape(tiles, spec.TILE_BITMAP_BYTES // 8)
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.add.reduce(np.bitwise_count(words), axis=1, dtype=np.int64)
    bits = np.unpackbits(padded).reshape(tiles, spec.TILE_SIZE)
    return np.add.reduce(bits, axis=1, dtype=np.int64)


def _compress_cpu(flat: np.ndarray):
    """Integer view [n] -> (bitmap, values, tiles) as numpy arrays."""
    n = flat.size
    bitmap = np.empty(spec.bitmap_bytes(n), dtype=np.uint8)
    for start in range(0, n, _CHUNK_ELEMENTS):
        packed = np.packbits(flat[start:start + _CHUNK_ELEMENTS] != 0, bitorder="little")
        bitmap[start // 8:start // 8 + packed.size] = packed
    tiles = np.zeros(spec.num_tiles(n) + 1, dtype=np.int64)
    np.cumsum(_tile_counts(bitmap, n), out=tiles[1:])
    values = np.empty(int(tiles[-1]), dtype=flat.dtype)
    per_chunk = _CHUNK_ELEMENTS // spec.TILE_SIZE
    for k, start in enumerate(range(0, n, _CHUNK_ELEMENTS)):
        part = flat[start:start + _CHUNK_ELEMENTS]
        lo, hi = tiles[k * per_chunk], tiles[min((k + 1) * per_chunk, tiles.size - 1)]
        np.compress(part != 0, part, out=values[lo:hi])
    return bitmap, values, tiles


def compress(tensor: torch.Tensor, values: str = DEFAULT_CODEC, **options) -> EndorTensor:
    """Compress a float32/float16/bfloat16 tensor of any shape and sparsity, its non-zero values
    stored by value codec `values` (docs/FORMAT.md, section 1.2): losslessly with "raw";
    "int8" / "int4" quantize them (lossy, docs/FORMAT.md section 1.6; option `group_size`,
    default 128)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"endor.compress takes a torch.Tensor, got {type(tensor).__name__}")
    if not isinstance(values, str) or values not in codec_names():
        raise ValueError(f"values={values!r} is not a value codec; choose one of {codec_names()}")
    if tensor.dtype not in spec.INT_VIEW:
        raise FormatError(f"dtype {tensor.dtype} is not supported; use one of "
                          f"{', '.join(spec.DTYPES)} (cast the tensor first)")
    if tensor.dim() > spec.MAX_RANK:
        raise FormatError(f"rank {tensor.dim()} exceeds the format's maximum of {spec.MAX_RANK}")
    codec = get_codec(values)
    if tensor.dtype not in codec.dtypes:
        raise ValueError(f"value codec {values!r} does not code {tensor.dtype}")
    tensor, options = codec.prepare(tensor, **options)
    flat = tensor.detach().contiguous().view(-1).view(spec.INT_VIEW[tensor.dtype])
    if flat.device.type == "cpu":
        bitmap, nonzero, tiles = (torch.from_numpy(a) for a in _compress_cpu(flat.numpy()))
        nonzero = nonzero.view(tensor.dtype)
    else:
        mask = flat != 0
        nonzero = flat[mask].view(tensor.dtype)
        bitmap = pack_bits(mask)
        tiles = tile_offsets(mask)
    params, parts = codec.encode(nonzero, tiles, **options)
    return EndorTensor.from_codec(tensor.shape, tensor.dtype, bitmap, tiles, nonzero.numel(),
                                  codec.name, params, parts)
