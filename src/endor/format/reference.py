"""The slow, obviously correct decompressor every fast one is tested against. Plain torch, any
device."""

import torch

from ..errors import FormatError
from . import spec
from .codecs import get_codec
from .encode import tile_offsets
from .tensor import EndorTensor


def unpack_bits(bitmap: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 [ceil(n/8)] -> bool [n] (LSB first); rejects set padding bits (rule 6)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmap.device)
    bits = ((bitmap.unsqueeze(1) >> shifts) & 1).view(-1)
    if bool(bits[numel:].any()):
        raise FormatError("bitmap has bits set past the last element")
    return bits[:numel].bool()


def decompress(et: EndorTensor, out: torch.Tensor) -> None:
    """Fill `out` (flat, contiguous, et.dtype, on et.device) with the dense tensor."""
    mask = unpack_bits(et.bitmap, et.numel)
    if not torch.equal(tile_offsets(mask), et.tiles):
        raise FormatError("bitmap popcounts disagree with the tile index (corrupt data)")
    values = get_codec(et.values_codec).decode_values(et.codec_params, et.codec_parts, et.tiles,
                                                      et.dtype)
    ints = out.view(spec.INT_VIEW[et.dtype])
    ints.zero_()
    ints[mask] = values.view(spec.INT_VIEW[et.dtype])
