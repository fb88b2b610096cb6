"""A safetensors file written piece by piece: the header first (every tensor's dtype and shape are
known up front), then each tensor's bytes in chunks, so a tensor larger than the memory budget
(a 128k-vocabulary embedding) never has to be held whole.

    writer = StreamWriter(path, {"a": (torch.float16, (4, 8)), ...}, metadata={...})
    for name in writer.order:            # the order the bytes must come in
        for chunk in chunks_of(name):    # rows at a time, C order
            writer.write(name, chunk)
    writer.close()                       # checks every byte came, renames into place

The file is byte-identical to what `io.save_file` writes for the same dense tensors (same data
order: dtype descending, then name; same compact JSON header padded with spaces to 8 bytes;
metadata keys sorted; the format's entry with every dense tensor's version-2 checksum). The
checksums are known only once the bytes have passed: the header is first written with
placeholders of the same length, then rewritten in place by `close`, which renames the file
into place (it is written under a temporary name)."""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import torch
import xxhash

from . import spec
from .checksum import PREFIX, canonical
from .io import chmod_as_created

# safetensors' dtype names and its data order (the Rust enum's order; the data section is
# sorted by dtype descending in it, then by name).
_ST_DTYPES = [(torch.bool, "BOOL"), (torch.uint8, "U8"), (torch.int8, "I8"),
              (torch.int16, "I16"), (torch.uint16, "U16"), (torch.float16, "F16"),
              (torch.bfloat16, "BF16"), (torch.int32, "I32"), (torch.uint32, "U32"),
              (torch.float32, "F32"), (torch.float64, "F64"), (torch.int64, "I64"),
              (torch.uint64, "U64")]
_NAME_OF = {t: n for t, n in _ST_DTYPES}
_RANK_OF = {t: i for i, (t, _) in enumerate(_ST_DTYPES)}


class StreamWriter:
    """Write one safetensors file whose tensors arrive in chunks (see the module docstring)."""

    def __init__(self, path, entries: Mapping[str, tuple], metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        meta = dict(metadata or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise ValueError("metadata must map str to str (as safetensors requires)")
        if spec.METADATA_KEY in meta:
            raise ValueError(f"metadata key {spec.METADATA_KEY!r} is reserved for the format")
        for name, (dtype, shape) in entries.items():
            if not isinstance(name, str) or not name or name == "__metadata__":
                raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
            if dtype not in _NAME_OF:
                raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        self.order = sorted(entries, key=lambda n: (-_RANK_OF[entries[n][0]], n))
        self._entries = {n: (dtype, [int(d) for d in shape]) for n, (dtype, shape) in
                         entries.items()}
        self._meta = meta
        self._hashes = {n: xxhash.xxh3_64(canonical({"dtype": _NAME_OF[dtype], "shape": shape}))
                        for n, (dtype, shape) in self._entries.items()}
        self._sizes = {n: math.prod(shape) * dtype.itemsize
                       for n, (dtype, shape) in self._entries.items()}
        raw = self._header(PREFIX + "0" * 16 for _ in self._entries)
        if len(raw) > spec.MAX_HEADER_BYTES:
            raise ValueError(f"the header would be {len(raw)} bytes, over the format's "
                             f"{spec.MAX_HEADER_BYTES}-byte limit")
        self._header_length = len(raw)
        self._dtypes = {n: entries[n][0] for n in self.order}
        self._next = 0  # index into order of the tensor being written
        self._written = 0  # bytes of that tensor so far
        self._file = open(self._tmp, "wb")
        try:
            self._file.write(struct.pack("<Q", len(raw)) + raw)
        except BaseException:
            self.abort()
            raise

    def _header(self, checksums) -> bytes:
        """The header with these dense checksums (in the order of `entries`), padded as
        safetensors pads it."""
        dense = {n: {"checksum": c} for n, c in zip(self._entries, checksums)}
        meta = {**self._meta, spec.METADATA_KEY: json.dumps(
            {"format": spec.FORMAT_NAME, "version": spec.VERSION, "tensors": {},
             "dense": dense})}
        header, offset = {"__metadata__": dict(sorted(meta.items()))}, 0
        for name in self.order:
            dtype, shape = self._entries[name]
            size = self._sizes[name]
            header[name] = {"dtype": _NAME_OF[dtype], "shape": shape,
                            "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        return raw.ljust(-(-len(raw) // 8) * 8, b" ")

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """The next bytes of `name` (a chunk of its C-order elements, any shape)."""
        if self._file is None:
            raise ValueError(f"{self.path}: the writer is closed")
        if name in self._sizes and chunk.numel() == 0 and chunk.dtype == self._dtypes[name]:
            return  # no bytes: nothing to place (empty tensors are complete from the start)
        while self._next < len(self.order) and self._written == self._sizes[self.order[self._next]]:
            self._next, self._written = self._next + 1, 0
        expected = self.order[self._next] if self._next < len(self.order) else None
        if name != expected:
            raise ValueError(f"{self.path}: got bytes of {name!r}, expected {expected!r} (tensors "
                             "must come in writer.order, each whole before the next)")
        if chunk.dtype != self._dtypes[name]:
            raise ValueError(f"{self.path}: tensor {name!r} is {self._dtypes[name]}, got a "
                             f"{chunk.dtype} chunk")
        data = chunk.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        if self._written + data.size > self._sizes[name]:
            raise ValueError(f"{self.path}: more bytes for {name!r} than its shape holds")
        self._file.write(memoryview(data))
        self._hashes[name].update(memoryview(data))
        self._written += data.size

    def close(self) -> Path:
        """Check that every tensor was written whole, then rename the file into place."""
        if self._file is None:
            raise ValueError(f"{self.path}: the writer is closed")
        while self._next < len(self.order) and self._written == self._sizes[self.order[self._next]]:
            self._next, self._written = self._next + 1, 0
        if self._next < len(self.order):
            missing = self.order[self._next]
            self.abort()
            raise ValueError(f"{self.path}: tensor {missing!r} was not written whole")
        try:
            raw = self._header(PREFIX + self._hashes[n].hexdigest() for n in self._entries)
            assert len(raw) == self._header_length, "checksums have a fixed length"
            self._file.seek(8)
            self._file.write(raw)
            self._file.close()
            self._file = None
            chmod_as_created(self._tmp)
            os.replace(self._tmp, self.path)
        finally:
            self.abort()
        return self.path

    def abort(self) -> None:
        """Drop the temporary file (nothing reaches the final name)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            self.abort()
