"""EndorTensor: one tensor as bitmap + packed non-zero values + tile index (docs/FORMAT.md)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

from . import spec
from .checksum import checksum as compute_checksum


@dataclass(frozen=True, eq=False)
class EndorTensor:
    """The compressed form of a dense tensor. Build one with `endor.compress`, read one with
    `endor.open_file(...).get_compressed(name)`, turn it back with `endor.decompress`."""

    shape: torch.Size
    dtype: torch.dtype
    bitmap: torch.Tensor  # uint8 [ceil(numel / 8)]
    values: torch.Tensor  # dtype [nnz]
    tiles: torch.Tensor  # int64 [num_tiles + 1]
    checksum: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        return self.values.numel()

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / self.numel if self.numel else 0.0

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def nbytes(self) -> int:
        """Every stored byte: bitmap, values, tile index and this tensor's metadata entry."""
        parts = sum(t.numel() * t.element_size() for t in (self.bitmap, self.values, self.tiles))
        return parts + len(json.dumps(self.metadata()))

    @property
    def dense_nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def metadata(self) -> dict:
        return {
            "shape": list(self.shape),
            "dtype": spec.DTYPE_NAMES[self.dtype],
            "nnz": self.nnz,
            "tile_size": spec.TILE_SIZE,
            "checksum": self.checksum,
        }

    def to(self, device, *, non_blocking: bool = False) -> EndorTensor:
        device = torch.device(device)
        if device == self.device:
            return self
        move = lambda t: t.to(device, non_blocking=non_blocking)  # noqa: E731
        return EndorTensor(self.shape, self.dtype, move(self.bitmap), move(self.values),
                           move(self.tiles), self.checksum)

    def pin_memory(self) -> EndorTensor:
        return EndorTensor(self.shape, self.dtype, self.bitmap.pin_memory(),
                           self.values.pin_memory(), self.tiles.pin_memory(), self.checksum)

    def verify_checksum(self) -> bool:
        return compute_checksum(self.bitmap, self.values, self.tiles) == self.checksum

    def __repr__(self) -> str:
        return (f"EndorTensor(shape={tuple(self.shape)}, dtype={self.dtype}, nnz={self.nnz}, "
                f"sparsity={self.sparsity:.3f}, nbytes={self.nbytes}, device={self.device})")
