"""The encoder: dense tensor -> EndorTensor. Vectorised torch, bit-exact by construction."""

import torch

from ..errors import FormatError
from . import spec
from .checksum import checksum
from .tensor import EndorTensor

_BIT_WEIGHTS = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8)


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


def compress(tensor: torch.Tensor) -> EndorTensor:
    """Compress a float32/float16/bfloat16 tensor of any shape and sparsity, losslessly."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"endor.compress takes a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in spec.INT_VIEW:
        raise FormatError(f"dtype {tensor.dtype} is not supported; use one of "
                          f"{', '.join(spec.DTYPES)} (cast the tensor first)")
    if tensor.dim() > spec.MAX_RANK:
        raise FormatError(f"rank {tensor.dim()} exceeds the format's maximum of {spec.MAX_RANK}")
    flat = tensor.detach().contiguous().view(-1).view(spec.INT_VIEW[tensor.dtype])
    mask = flat != 0
    values = flat[mask].view(tensor.dtype)
    bitmap = pack_bits(mask)
    tiles = tile_offsets(mask)
    return EndorTensor(tensor.shape, tensor.dtype, bitmap, values, tiles,
                       checksum(bitmap, values, tiles))
