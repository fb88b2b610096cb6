"""Bounded parse of a safetensors header: gives each stored tensor's byte range in the file, which
the safetensors library does not expose and direct (page-cache-bypassing) reads need."""

import json
import math
import os
import struct
from dataclasses import dataclass

from ..errors import FormatError
from .spec import ITEMSIZE, MAX_HEADER_BYTES


@dataclass(frozen=True)
class StoredTensor:
    dtype: str
    shape: tuple
    start: int  # absolute offset in the file
    end: int


@dataclass(frozen=True)
class Header:
    tensors: dict  # name -> StoredTensor
    metadata: dict  # __metadata__ (str -> str)
    data_start: int
    file_size: int


def read_header(path) -> Header:
    """Parse and check rule 1 of docs/FORMAT.md for `path`; never allocates more than the bound."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise FormatError(f"file is {file_size} bytes, too short for a safetensors header",
                                  path=path)
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or n > file_size - 8:
                raise FormatError(f"header length {n} exceeds the file ({file_size} bytes) or the "
                                  f"{MAX_HEADER_BYTES}-byte limit: truncated or corrupt", path=path)
            raw = f.read(n)
    except OSError as e:
        raise FormatError(f"cannot read: {e.strerror or e}", path=path) from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise FormatError(f"header is not valid UTF-8 JSON ({e})", path=path) from None
    if not isinstance(header, dict):
        raise FormatError("header is not a JSON object", path=path)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise FormatError("__metadata__ is not a string-to-string object", path=path)
    data_start = 8 + n
    data_size = file_size - data_start
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            ok = (dtype in ITEMSIZE and isinstance(shape, list)
                  and all(isinstance(d, int) and d >= 0 for d in shape)
                  and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise FormatError("malformed safetensors entry", path=path, tensor=name)
        if end > data_size:
            raise FormatError(f"data range [{begin}, {end}) runs past the end of the data "
                              f"({data_size} bytes): the file is truncated", path=path, tensor=name)
        if end - begin != math.prod(shape) * ITEMSIZE[dtype]:
            raise FormatError(f"byte range of {end - begin} does not match shape {shape} of "
                              f"{dtype}", path=path, tensor=name)
        tensors[name] = StoredTensor(dtype, tuple(shape), data_start + begin, data_start + end)
    return Header(tensors, metadata, data_start, file_size)
