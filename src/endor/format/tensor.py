"""EndorTensor: one tensor as bitmap + tile index + non-zero values stored by a value codec
(docs/FORMAT.md)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..errors import FormatError
from . import spec
from .checksum import checksum_v1, checksum_v2, endor_description
from .codecs import get_codec

BITMAP, TILES = "bitmap", "tiles"


@dataclass(frozen=True, eq=False)
class EndorTensor:
    """The compressed form of a dense tensor. Build one with `endor.compress`, read one with
    `endor.open_file(...).get_compressed(name)`, turn it back with `endor.decompress`.

    `codec_parts` holds the value codec's parts by suffix; with the `raw` codec `values` is its
    one part (the non-zero values), with other codecs it is None. `version` is the format
    version whose checksum rule `checksum` follows (1 for tensors read from version-1 files)."""

    shape: torch.Size
    dtype: torch.dtype
    bitmap: torch.Tensor  # uint8 [ceil(numel / 8)]
    values: torch.Tensor | None  # dtype [nnz] with the raw codec, else None
    tiles: torch.Tensor  # int64 [num_tiles + 1]
    checksum: str
    values_codec: str = "raw"
    codec_params: Mapping = field(default_factory=dict)
    codec_parts: Mapping[str, torch.Tensor] | None = None
    version: int = spec.VERSION
    stored_nnz: int | None = None  # nnz when `values` is None

    def __post_init__(self):
        if self.codec_parts is None:
            if self.values_codec != "raw" or self.values is None:
                raise ValueError("codec_parts is required for a codec other than raw")
            object.__setattr__(self, "codec_parts", {"values": self.values})
        elif self.values is None and self.values_codec == "raw":
            object.__setattr__(self, "values", self.codec_parts["values"])
        if self.values is None and self.stored_nnz is None:
            raise ValueError("stored_nnz is required when values is None")

    @classmethod
    def from_codec(cls, shape, dtype: torch.dtype, bitmap: torch.Tensor, tiles: torch.Tensor,
                   nnz: int, codec: str, params: Mapping, parts: Mapping[str, torch.Tensor]
                   ) -> EndorTensor:
        """A new tensor in the current format version, its checksum computed."""
        values = parts["values"] if codec == "raw" else None
        et = cls(torch.Size(shape), dtype, bitmap, values, tiles, "", codec, dict(params),
                 dict(parts), spec.VERSION, nnz)
        return dataclasses.replace(et, checksum=et.compute_checksum())

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        return self.values.numel() if self.values is not None else self.stored_nnz

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / self.numel if self.numel else 0.0

    @property
    def device(self) -> torch.device:
        return self.bitmap.device

    def values_entry(self) -> dict:
        """The metadata's `values` object: the codec's name and parameters."""
        return {"codec": self.values_codec, **self.codec_params}

    def stored_parts(self) -> dict[str, torch.Tensor]:
        """suffix -> part, in checksum order: bitmap, tiles, then the codec's parts (version 1:
        bitmap, values, tiles)."""
        if self.version == 1:
            return {BITMAP: self.bitmap, "values": self.values, TILES: self.tiles}
        order = get_codec(self.values_codec).parts(self.shape, self.dtype, self.nnz,
                                                   self.codec_params)
        return {BITMAP: self.bitmap, TILES: self.tiles,
                **{suffix: self.codec_parts[suffix] for suffix in order}}

    @property
    def values_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.codec_parts.values())

    @property
    def nbytes(self) -> int:
        """Every stored byte: bitmap, tile index, the codec's parts and this tensor's metadata
        entry."""
        parts = sum(t.numel() * t.element_size() for t in (self.bitmap, self.tiles))
        return parts + self.values_nbytes + len(json.dumps(self.metadata()))

    @property
    def dense_nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def metadata(self) -> dict:
        entry = {"shape": list(self.shape), "dtype": spec.DTYPE_NAMES[self.dtype],
                 "nnz": self.nnz, "tile_size": spec.TILE_SIZE}
        if self.version >= 2:
            entry["values"] = self.values_entry()
        entry["checksum"] = self.checksum
        return entry

    def _map(self, fn) -> EndorTensor:
        parts = {k: fn(v) for k, v in self.codec_parts.items()}
        return dataclasses.replace(
            self, bitmap=fn(self.bitmap), tiles=fn(self.tiles), codec_parts=parts,
            values=parts["values"] if self.values is not None else None,
            stored_nnz=self.nnz)

    def to(self, device, *, non_blocking: bool = False) -> EndorTensor:
        device = torch.device(device)
        if device == self.device:
            return self
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> EndorTensor:
        return self._map(lambda t: t.pin_memory())

    def compute_checksum(self) -> str:
        if self.version == 1:
            return checksum_v1(self.bitmap, self.values, self.tiles)
        description = endor_description(self.shape, spec.DTYPE_NAMES[self.dtype], self.nnz,
                                        self.values_entry())
        return checksum_v2(description, self.stored_parts().values())

    def verify_checksum(self) -> bool:
        return self.compute_checksum() == self.checksum

    def upgraded(self) -> EndorTensor:
        """This tensor under the current version's checksum rule (what a writer stores): a
        version-1 tensor's old checksum is verified first, so corrupt data is never re-blessed."""
        if self.version == spec.VERSION:
            return self
        if not self.verify_checksum():
            raise FormatError("checksum mismatch: the data is corrupt")
        et = dataclasses.replace(self, version=spec.VERSION, stored_nnz=self.nnz)
        return dataclasses.replace(et, checksum=et.compute_checksum())

    def __repr__(self) -> str:
        return (f"EndorTensor(shape={tuple(self.shape)}, dtype={self.dtype}, nnz={self.nnz}, "
                f"sparsity={self.sparsity:.3f}, values={self.values_codec!r}, "
                f"nbytes={self.nbytes}, device={self.device})")
