"""XXH3-64 checksums of stored tensors (docs/FORMAT.md, rule 7).

Version 1 hashes an Endor tensor's three parts only. Version 2 hashes a canonical serialization
of what the metadata says about the tensor (shape, dtype, nnz, value codec and its parameters)
and then every part, so a header edited to another shape or codec of the same size fails too;
dense tensors get the same treatment (dtype and shape, then the bytes)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

import torch
import xxhash

PREFIX = "xxh3_64:"


def bytes_view(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor of any dtype (copied to the cpu if needed)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _digest(h) -> str:
    return PREFIX + h.hexdigest()


def checksum_v1(bitmap: torch.Tensor, values: torch.Tensor, tiles: torch.Tensor) -> str:
    h = xxhash.xxh3_64()
    for part in (bitmap, values, tiles):
        h.update(bytes_view(part))
    return _digest(h)


def canonical(description: Mapping) -> bytes:
    """The header bytes of a version-2 checksum: the JSON of `description` with sorted keys and
    no spaces, preceded by its length as 8 little-endian bytes."""
    raw = json.dumps(description, sort_keys=True, separators=(",", ":"),
                     ensure_ascii=True).encode()
    return len(raw).to_bytes(8, "little") + raw


def checksum_v2(description: Mapping, parts: Iterable[torch.Tensor]) -> str:
    h = xxhash.xxh3_64(canonical(description))
    for part in parts:
        h.update(bytes_view(part))
    return _digest(h)


def endor_description(shape, dtype_name: str, nnz: int, values_entry: Mapping) -> dict:
    """What a version-2 Endor checksum covers besides the parts (values_entry: {"codec", ...})."""
    return {"shape": list(shape), "dtype": dtype_name, "nnz": nnz, "values": dict(values_entry)}


def dense_checksum(st_dtype: str, shape, data: torch.Tensor) -> str:
    """Version 2's checksum of a dense tensor: safetensors dtype name, shape, then its bytes."""
    return checksum_v2({"dtype": st_dtype, "shape": list(shape)}, (data,))


def is_checksum(digest) -> bool:
    return (isinstance(digest, str) and digest.startswith(PREFIX)
            and len(digest) == len(PREFIX) + 16
            and all(c in "0123456789abcdef" for c in digest[len(PREFIX):]))
