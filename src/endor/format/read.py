"""Positioned reads of stored tensors into memory the process owns.

A tensor read here is a copy: rewriting or truncating its file later cannot change it, and a
file that shrank between parsing its header and reading is a clean error, not the SIGBUS a
memory map faults with."""

from __future__ import annotations

import os

import torch

from ..errors import FormatError
from .header import StoredTensor
from .spec import SAFETENSORS_DTYPES

_READ_CHUNK = 1 << 28  # Linux reads at most ~2 GiB per call; stay well below


def read_stored(path, stored: StoredTensor, name: str) -> torch.Tensor:
    """A new CPU tensor holding one safetensors entry of `path` (its byte range from the parsed,
    bounded header), read with positioned reads into a fresh buffer (no mmap)."""
    out = torch.empty(stored.shape, dtype=SAFETENSORS_DTYPES[stored.dtype])
    size = stored.end - stored.start
    if size == 0:
        return out
    buffer = memoryview(out.view(-1).view(torch.uint8).numpy()).cast("B")
    assert len(buffer) == size
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise FormatError(f"cannot read: {e.strerror or e}", path=path, tensor=name) from e
    try:
        done = 0
        while done < size:
            n = os.preadv(fd, [buffer[done:done + _READ_CHUNK]], stored.start + done)
            if n <= 0:
                raise FormatError(f"the file ended after {done} of {size} bytes of this "
                                  "tensor (truncated, or changed since it was opened)",
                                  path=path, tensor=name)
            done += n
    except OSError as e:
        raise FormatError(f"cannot read: {e.strerror or e}", path=path, tensor=name) from e
    finally:
        os.close(fd)
    return out
