"""Constants of the Endor format, version 1 (docs/FORMAT.md)."""

import torch

FORMAT_NAME = "endor"
VERSION = 1
METADATA_KEY = "endor"
TILE_SIZE = 4096  # elements per tile
TILE_BITMAP_BYTES = TILE_SIZE // 8
MAX_RANK = 8
MAX_NUMEL = 2**48
MAX_HEADER_BYTES = 100_000_000

BITMAP_SUFFIX = ".endor.bitmap"
VALUES_SUFFIX = ".endor.values"
TILES_SUFFIX = ".endor.tiles"
PART_SUFFIXES = (BITMAP_SUFFIX, VALUES_SUFFIX, TILES_SUFFIX)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# Same-width integer views: decoders move bit patterns, never float values.
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def num_tiles(numel: int) -> int:
    return -(-numel // TILE_SIZE)


def bitmap_bytes(numel: int) -> int:
    return -(-numel // 8)


def part_names(name: str) -> tuple[str, str, str]:
    return name + BITMAP_SUFFIX, name + VALUES_SUFFIX, name + TILES_SUFFIX


def is_part_name(name: str) -> bool:
    return name.endswith(PART_SUFFIXES)
