"""Checks of docs/FORMAT.md rules 2-5 and 7, run on everything read from a file before decoding."""

import json
import math

import torch

from ..errors import FormatError
from . import spec
from .checksum import PREFIX

_ENTRY_FIELDS = {"shape", "dtype", "nnz", "tile_size", "checksum"}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_metadata(raw: str | None) -> dict:
    """Rule 2: the `endor` metadata value -> its `tensors` dict (empty if the key is absent)."""
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"the '{spec.METADATA_KEY}' metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != spec.FORMAT_NAME:
        raise FormatError(f"the '{spec.METADATA_KEY}' metadata is not an object with "
                          f"\"format\": \"{spec.FORMAT_NAME}\"")
    version = meta.get("version")
    if not _is_int(version):
        raise FormatError("the Endor metadata has no integer 'version'")
    if version != spec.VERSION:
        hint = "upgrade endor to read it" if version > spec.VERSION else "it was never written"
        raise FormatError(f"format version {version} is not supported (this endor reads "
                          f"version {spec.VERSION}); {hint}")
    tensors = meta.get("tensors")
    if not isinstance(tensors, dict):
        raise FormatError("the Endor metadata has no 'tensors' object")
    return tensors


def check_entry(name: str, entry) -> tuple[torch.Size, torch.dtype, int, str]:
    """Rule 3 for one entry -> (shape, dtype, nnz, checksum)."""
    def bad(reason):
        return FormatError(reason, tensor=name)

    if not isinstance(entry, dict):
        raise bad("metadata entry is not a JSON object")
    if set(entry) != _ENTRY_FIELDS:
        raise bad(f"metadata entry has fields {sorted(entry)}, expected {sorted(_ENTRY_FIELDS)}")
    shape, dtype_name, nnz = entry["shape"], entry["dtype"], entry["nnz"]
    if (not isinstance(shape, list) or len(shape) > spec.MAX_RANK
            or not all(_is_int(d) and d >= 0 for d in shape)):
        raise bad(f"shape {shape!r} is not a list of at most {spec.MAX_RANK} non-negative ints")
    numel = math.prod(shape)
    if numel > spec.MAX_NUMEL:
        raise bad(f"shape {shape} has {numel} elements, more than the limit {spec.MAX_NUMEL}")
    if dtype_name not in spec.DTYPES:
        raise bad(f"dtype {dtype_name!r} is not one of {sorted(spec.DTYPES)}")
    if entry["tile_size"] != spec.TILE_SIZE:
        raise bad(f"tile_size {entry['tile_size']!r} is not {spec.TILE_SIZE}")
    if not _is_int(nnz) or not 0 <= nnz <= numel:
        raise bad(f"nnz {nnz!r} is not an integer in [0, {numel}]")
    digest = entry["checksum"]
    if (not isinstance(digest, str) or not digest.startswith(PREFIX)
            or len(digest) != len(PREFIX) + 16
            or any(c not in "0123456789abcdef" for c in digest[len(PREFIX):])):
        raise bad(f"checksum {digest!r} is not '{PREFIX}' followed by 16 lowercase hex digits")
    return torch.Size(shape), spec.DTYPES[dtype_name], nnz, digest


def expected_parts(shape: torch.Size, dtype: torch.dtype, nnz: int) -> dict[str, tuple[str, list]]:
    """Rule 4: suffix -> (safetensors dtype, shape) of each part."""
    numel = math.prod(shape)
    return {
        spec.BITMAP_SUFFIX: ("U8", [spec.bitmap_bytes(numel)]),
        spec.VALUES_SUFFIX: (spec.SAFETENSORS_NAMES[dtype], [nnz]),
        spec.TILES_SUFFIX: ("I64", [spec.num_tiles(numel) + 1]),
    }


def check_tiles(tiles: torch.Tensor, numel: int, nnz: int) -> None:
    """Rule 5, vectorised: O(num_tiles)."""
    if tiles.numel() == 0 or int(tiles[0]) != 0 or int(tiles[-1]) != nnz:
        raise FormatError("tile index must start at 0 and end at nnz")
    counts = tiles[1:] - tiles[:-1]
    lengths = torch.full_like(counts, spec.TILE_SIZE)
    if lengths.numel():
        lengths[-1] = numel - spec.TILE_SIZE * (lengths.numel() - 1)
    if bool(((counts < 0) | (counts > lengths)).any()):
        k = int(((counts < 0) | (counts > lengths)).nonzero()[0])
        raise FormatError(f"tile {k} claims {int(counts[k])} non-zeros, outside "
                          f"[0, {int(lengths[k])}]")
