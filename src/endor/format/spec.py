"""Constants of the Endor format, versions 1 and 2 (docs/FORMAT.md)."""

import re

import torch

FORMAT_NAME = "endor"
VERSION = 2  # what writers write
READABLE_VERSIONS = (1, 2)
METADATA_KEY = "endor"
TILE_SIZE = 4096  # elements per tile
TILE_BITMAP_BYTES = TILE_SIZE // 8
MAX_RANK = 8
MAX_NUMEL = 2**48
MAX_HEADER_BYTES = 100_000_000

BITMAP_SUFFIX = ".endor.bitmap"
VALUES_SUFFIX = ".endor.values"
TILES_SUFFIX = ".endor.tiles"
PART_SUFFIXES = (BITMAP_SUFFIX, VALUES_SUFFIX, TILES_SUFFIX)  # version 1's only parts
PART_MARKER = ".endor."
# Version 2: a codec's part suffixes are lowercase words; any `NAME.endor.<word>` is reserved.
_V2_PART = re.compile(r"\.endor\.[a-z0-9_]+$")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# The safetensors dtype names this package reads and writes (safetensors' own spelling), once.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
ITEMSIZE = {k: v.itemsize for k, v in SAFETENSORS_DTYPES.items()}  # bytes per element, by name
# Same-width integer views: decompressors move bit patterns, never float values.
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # any dtype's bits


def num_tiles(numel: int) -> int:
    return -(-numel // TILE_SIZE)


def bitmap_bytes(numel: int) -> int:
    return -(-numel // 8)


def part_names(name: str) -> tuple[str, str, str]:
    """Version 1's stored names of an Endor tensor (and version 2's with the raw codec)."""
    return name + BITMAP_SUFFIX, name + VALUES_SUFFIX, name + TILES_SUFFIX


def part_name(name: str, suffix: str) -> str:
    """Stored name of part `suffix` ("bitmap", "tiles" or a codec's own) of Endor tensor `name`."""
    return name + PART_MARKER + suffix


def is_part_name(name: str, version: int = VERSION) -> bool:
    """Rule 8: whether `name` is reserved for the parts of Endor tensors."""
    if version == 1:
        return name.endswith(PART_SUFFIXES)
    return _V2_PART.search(name) is not None


def owner_name(part: str) -> str:
    """The Endor tensor a part name belongs to."""
    return part.rsplit(PART_MARKER, 1)[0]
