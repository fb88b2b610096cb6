"""Checks of docs/FORMAT.md rules 2-5, run on everything read from a file before decompressing."""

import json
import math
from dataclasses import dataclass

import torch

from ..errors import FormatError
from . import spec
from .checksum import PREFIX, is_checksum
from .codecs import check_values_entry, get_codec

_ENTRY_FIELDS = {1: {"shape", "dtype", "nnz", "tile_size", "checksum"},
                 2: {"shape", "dtype", "nnz", "tile_size", "values", "checksum"}}


@dataclass(frozen=True)
class Metadata:
    version: int
    tensors: dict  # Endor tensor name -> raw entry
    dense: dict  # dense tensor name -> raw entry (version 2; empty for version 1)


@dataclass(frozen=True)
class Entry:
    """A checked Endor tensor entry (rule 3)."""
    shape: torch.Size
    dtype: torch.dtype
    nnz: int
    checksum: str
    codec: str  # "raw" for version 1
    params: dict

    def __iter__(self):
        """Unpacks as (shape, dtype, nnz, checksum), what entries were before value codecs."""
        return iter((self.shape, self.dtype, self.nnz, self.checksum))

    def __getitem__(self, i):
        return (self.shape, self.dtype, self.nnz, self.checksum)[i]


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def parse_metadata(raw: str | None) -> Metadata | None:
    """Rule 2: the `endor` metadata value (None if the key is absent)."""
    if raw is None:
        return None
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
    if version not in spec.READABLE_VERSIONS:
        hint = "upgrade endor to read it" if version > spec.VERSION else "it was never written"
        raise FormatError(f"format version {version} is not supported (this endor reads "
                          f"versions {', '.join(map(str, spec.READABLE_VERSIONS))}); {hint}")
    tensors = meta.get("tensors")
    if not isinstance(tensors, dict):
        raise FormatError("the Endor metadata has no 'tensors' object")
    dense = {}
    if version >= 2:
        dense = meta.get("dense")
        if not isinstance(dense, dict):
            raise FormatError("the Endor metadata has no 'dense' object (version 2)")
    return Metadata(version, tensors, dense)


def _check_checksum(digest, bad) -> str:
    if not is_checksum(digest):
        raise bad(f"checksum {digest!r} is not '{PREFIX}' followed by 16 lowercase hex digits")
    return digest


def check_entry(name: str, entry, version: int = spec.VERSION) -> Entry:
    """Rule 3 for one Endor tensor entry."""
    def bad(reason):
        return FormatError(reason, tensor=name)

    if not isinstance(entry, dict):
        raise bad("metadata entry is not a JSON object")
    fields = _ENTRY_FIELDS[version]
    if set(entry) != fields:
        raise bad(f"metadata entry has fields {sorted(entry)}, expected {sorted(fields)}")
    shape, dtype_name, nnz = entry["shape"], entry["dtype"], entry["nnz"]
    if (not isinstance(shape, list) or len(shape) > spec.MAX_RANK
            or not all(_is_int(d) and d >= 0 for d in shape)):
        raise bad(f"shape {shape!r} is not a list of at most {spec.MAX_RANK} non-negative ints")
    numel = math.prod(shape)
    if numel > spec.MAX_NUMEL:
        raise bad(f"shape {shape} has {numel} elements, more than the limit {spec.MAX_NUMEL}")
    if dtype_name not in spec.DTYPES:
        raise bad(f"dtype {dtype_name!r} is not one of {sorted(spec.DTYPES)}")
    dtype = spec.DTYPES[dtype_name]
    if entry["tile_size"] != spec.TILE_SIZE:
        raise bad(f"tile_size {entry['tile_size']!r} is not {spec.TILE_SIZE}")
    if not _is_int(nnz) or not 0 <= nnz <= numel:
        raise bad(f"nnz {nnz!r} is not an integer in [0, {numel}]")
    digest = _check_checksum(entry["checksum"], bad)
    codec, params = "raw", {}
    if version >= 2:
        try:
            codec, params = check_values_entry(entry["values"], dtype)
        except FormatError as e:
            raise e.at(tensor=name) from None
    return Entry(torch.Size(shape), dtype, nnz, digest, codec, params)


def check_dense_entry(name: str, entry) -> str:
    """Rule 3 for a dense tensor's entry (version 2) -> its checksum."""
    def bad(reason):
        return FormatError(reason, tensor=name)

    if not isinstance(entry, dict) or set(entry) != {"checksum"}:
        raise bad(f"dense metadata entry is {entry!r}, expected {{\"checksum\": ...}}")
    return _check_checksum(entry["checksum"], bad)


def expected_parts(entry: Entry, version: int = spec.VERSION) -> dict[str, tuple[str, list]]:
    """Rule 4: part suffix -> (safetensors dtype, shape), in checksum order, from the checked
    entry alone."""
    numel = math.prod(entry.shape)
    bitmap = ("U8", [spec.bitmap_bytes(numel)])
    tiles = ("I64", [spec.num_tiles(numel) + 1])
    if version == 1:
        return {"bitmap": bitmap, "values": (spec.SAFETENSORS_NAMES[entry.dtype], [entry.nnz]),
                "tiles": tiles}
    codec = get_codec(entry.codec)
    own = codec.parts(entry.shape, entry.dtype, entry.nnz, entry.params)
    for suffix in own:
        if suffix in ("bitmap", "tiles") or not spec.is_part_name(spec.part_name("", suffix)):
            raise AssertionError(f"codec {codec.name} declares a bad part suffix {suffix!r}")
    return {"bitmap": bitmap, "tiles": tiles, **own}


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
