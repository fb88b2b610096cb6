"""The "rest" shard (embeddings, final norm, LM head) written in chunks of rows, straight from the
source file into the output shard: a 128k-vocabulary, hidden-8192 embedding is 2 GB in bf16, and
neither it nor the head is ever held whole.

    tied copies: compared chunk by chunk with what they are tied to; equal ones are left out
                 (transformers ties them again on load)
    each tensor: rows read with positioned reads -> written -> hashed (XXH3-128)
    verify:      the shard is opened as a reader would, and every tensor's bytes on disk are
                 read back in chunks and hashed: the hash must be the one of the bytes written
"""

from __future__ import annotations

import os

import numpy as np
import torch
import xxhash

from ..errors import FormatError
from ..format import open_file
from ..format.spec import SAFETENSORS_DTYPES

CHUNK_BYTES = 64 * 2**20


def row_chunks(source, name: str, chunk_bytes: int = CHUNK_BYTES):
    """`name` from `source` as consecutive row blocks of about `chunk_bytes` (one block for a
    0-d or empty tensor)."""
    shape = tuple(source.shape(name))
    if not shape or shape[0] == 0:
        yield source.read(name)
        return
    row_bytes = max(1, source.nbytes(name) // shape[0]) if source.nbytes(name) else 1
    step = max(1, chunk_bytes // row_bytes)
    for start in range(0, shape[0], step):
        yield source.read_rows(name, start, min(start + step, shape[0]))


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def same_tensor(source, a: str, b: str, chunk_bytes: int = CHUNK_BYTES) -> bool:
    """Whether tensors `a` and `b` of `source` have the same dtype, shape and bits, read one
    chunk of each at a time."""
    if source.dtype(a) != source.dtype(b) or tuple(source.shape(a)) != tuple(source.shape(b)):
        return False
    return all(np.array_equal(_bytes(x), _bytes(y)) for x, y in
               zip(row_chunks(source, a, chunk_bytes), row_chunks(source, b, chunk_bytes)))


def untied(source, names: list[str], tied: dict) -> list[str]:
    """`names` without the tied copies equal to what they are tied to."""
    drop = {target for target, origin in tied.items()
            if target in names and origin in names and same_tensor(source, target, origin)}
    return [n for n in names if n not in drop]


def _hash_on_disk(fd: int, start: int, size: int, buffer: np.ndarray) -> str:
    h = xxhash.xxh3_128()
    for offset in range(0, size, buffer.size):
        n = min(buffer.size, size - offset)
        if os.preadv(fd, [buffer[:n]], start + offset) != n:
            return "short read"
        h.update(memoryview(buffer[:n]))
    return h.hexdigest()


def verify_streamed(path, digests: dict, entries: dict) -> None:
    """Open the shard as a reader would and check every tensor's dtype, shape and the hash of
    its bytes on disk against what was written. A failing shard is deleted, the error raised."""
    try:
        with open_file(path) as f:
            stored = dict(f.header.tensors)
        if set(stored) != set(digests):
            raise FormatError(f"verification failed: the shard holds {sorted(stored)}, expected "
                              f"{sorted(digests)}", path=path)
        buffer = np.empty(CHUNK_BYTES, dtype=np.uint8)
        fd = os.open(path, os.O_RDONLY)
        try:
            for name, digest in digests.items():
                st = stored[name]
                dtype, shape = entries[name]
                if (SAFETENSORS_DTYPES.get(st.dtype) != dtype or tuple(st.shape) != tuple(shape)
                        or _hash_on_disk(fd, st.start, st.end - st.start, buffer) != digest):
                    raise FormatError("verification failed: the tensor read back differs from "
                                      "the one written (disk fault)", path=path, tensor=name)
        finally:
            os.close(fd)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def write_rest_shard(source, names: list[str], tied: dict, writer, index: int, metadata: dict,
                     *, verify: bool) -> None:
    """Write shard `index` of `writer` with the tensors `names` of `source` (tied copies left
    out), in chunks; read it back and check it when `verify`."""
    kept = untied(source, names, tied)
    entries = {n: (source.dtype(n), tuple(source.shape(n))) for n in kept}
    digests = {}
    with writer.stream(index, entries, metadata) as out:
        for name in out.order:
            h = xxhash.xxh3_128()
            for chunk in row_chunks(source, name):
                out.write(name, chunk)
                h.update(_bytes(chunk))
                del chunk
            digests[name] = h.hexdigest()
        path = out.close()
    if verify:
        verify_streamed(path, digests, entries)
