"""No fixed floor: the embeddings and the LM head kept out of memory when the budget is small.

A token needs one row of the embedding table, and the head is just another matrix. When the
budget is below the non-layer weights (on a Qwen2.5-0.5B-shaped model, untied head and a 152k
vocabulary, they are 545 MB, 43% of it), load_model replaces

    the input embedding  by OnDemandEmbedding: the rows of the token ids in use, read from the
                         rest shard with positioned reads (one row = hidden x dtype bytes),
    the LM head          by StreamedHead: its rows read in chunks of HEAD_CHUNK_BYTES into one
                         reused buffer, each chunk's logits computed as it arrives,

and only the other non-layer tensors (the final norm...) stay resident. Both read the dense
tensors of the rest shard (the converter stores them dense). Like a streamed layer's shard, each
is read whole once at load and checked against its stored checksum, and the digest of every
block of rows (about DIGEST_BLOCK_BYTES) kept: every later read covers whole blocks and checks
them, so a file changed or truncated afterwards is a clean FormatError, never other weights.
Reads are buffered and the pages dropped from the page cache after each head pass, so every
token reads the head cold, as the decoder layers are read."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
import xxhash
from torch import nn

from ..errors import FormatError
from ..format import EndorFile
from ..format.checksum import canonical, PREFIX
from ..format.header import StoredTensor
from ..format.spec import SAFETENSORS_DTYPES
from .plan import stored_nbytes

# Rows of the head read and multiplied at a time: the only buffer the streamed head holds.
HEAD_CHUNK_BYTES = 16 * 2**20
# The rows one digest covers, in bytes (at least one row): a token's embedding row costs a read
# and a hash of its block; the head hashes what it reads anyway.
DIGEST_BLOCK_BYTES = 64 * 2**10


@dataclass(frozen=True)
class RowSource:
    """A dense 2-D tensor of a shard, read by blocks of `block_rows` rows, each checked against
    the digest taken when it was verified at load (verified_source)."""
    path: str
    name: str
    stored: StoredTensor
    block_rows: int = 1
    digests: tuple[int, ...] = field(default=(), repr=False)  # XXH3-64 of each block of rows

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.stored.shape)

    @property
    def dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.stored.dtype]

    @property
    def row_bytes(self) -> int:
        return (self.stored.end - self.stored.start) // self.shape[0]

    def read_blocks(self, fd: int, start: int, out: torch.Tensor) -> None:
        """Rows [start, start + out.shape[0]) into `out` (contiguous, this dtype): `start` on a
        block boundary, and the rows end on one or at the last row. Every block is checked
        against its digest."""
        if start % self.block_rows or (start + out.shape[0] != self.shape[0]
                                       and out.shape[0] % self.block_rows):
            raise ValueError("rows must cover whole blocks")
        view = self._read(fd, start, out)
        block = self.block_rows * self.row_bytes
        for k, at in enumerate(range(0, len(view), block)):
            if xxhash.xxh3_64_intdigest(view[at:at + block]) != \
                    self.digests[start // self.block_rows + k]:
                raise FormatError("checksum mismatch: the file changed on disk since the model "
                                  f"was loaded (rows {start + k * self.block_rows}...)",
                                  path=self.path, tensor=self.name)

    def _read(self, fd: int, start: int, out: torch.Tensor) -> memoryview:
        view = memoryview(out.view(-1).view(torch.uint8).numpy()).cast("B")
        offset, size, done = self.stored.start + start * self.row_bytes, len(view), 0
        try:
            while done < size:
                n = os.preadv(fd, [view[done:]], offset + done)
                if n <= 0:
                    raise FormatError(f"the file ended after {done} of {size} bytes of rows "
                                      f"from {start} (truncated since it was loaded)",
                                      path=self.path, tensor=self.name)
                done += n
        except OSError as e:
            raise FormatError(f"cannot read: {e.strerror or e}", path=self.path,
                              tensor=self.name) from e
        return view

    def open(self) -> int:
        try:
            return os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise FormatError(f"cannot read: {e.strerror or e}", path=self.path,
                              tensor=self.name) from e


def row_source(f: EndorFile, name: str,
               block_bytes: int = DIGEST_BLOCK_BYTES) -> RowSource | None:
    """The tensor as a verified RowSource (verified_source) with digests over blocks of about
    `block_bytes` (at least a row), or None when it cannot be read by rows (compressed, not
    2-D)."""
    if f.is_compressed(name):
        return None
    stored = f.header.tensors[name]
    if len(stored.shape) != 2 or stored.shape[0] == 0:
        return None
    return verified_source(RowSource(str(f.path), name, stored), f.dense_checksum(name),
                           block_bytes)


def verified_source(source: RowSource, checksum: str | None,
                    block_bytes: int = DIGEST_BLOCK_BYTES) -> RowSource:
    """Read the tensor whole once, in chunks, check it against its stored `checksum` (rule 7;
    files without one, version 1, are taken as read) and return it with the digest of each block
    of rows, which every later read is checked against."""
    rows, row_bytes = source.shape[0], source.row_bytes
    block_rows = digest_block_rows(row_bytes, block_bytes)
    block = block_rows * row_bytes
    chunk_rows = head_chunk_rows(rows, max(row_bytes, 1), block_rows, HEAD_CHUNK_BYTES)
    whole = xxhash.xxh3_64(canonical({"dtype": source.stored.dtype,
                                      "shape": list(source.shape)}))
    digests = []
    buffer = torch.empty(chunk_rows, source.shape[1], dtype=source.dtype)
    fd = source.open()
    try:
        for start in range(0, rows, chunk_rows):
            n = min(chunk_rows, rows - start)
            view = source._read(fd, start, buffer[:n])
            whole.update(view)
            digests.extend(xxhash.xxh3_64_intdigest(view[at:at + block])
                           for at in range(0, len(view), block))
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if checksum is not None and PREFIX + whole.hexdigest() != checksum:
        raise FormatError("checksum mismatch: the data is corrupt", path=source.path,
                          tensor=source.name)
    return RowSource(source.path, source.name, source.stored, block_rows, tuple(digests))


class OnDemandEmbedding(nn.Module):
    """nn.Embedding whose table stays on disk: forward reads the rows of the ids it is given."""

    def __init__(self, source: RowSource, *, device, padding_idx=None):
        super().__init__()
        self.source = source
        self.num_embeddings, self.embedding_dim = source.shape
        self.padding_idx = padding_idx
        self.device = torch.device(device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_embeddings):
            raise IndexError(f"token id out of range [0, {self.num_embeddings})")
        unique, inverse = torch.unique(ids.cpu(), return_inverse=True)
        rows = torch.empty(len(unique), self.embedding_dim, dtype=self.source.dtype)
        per_block = self.source.block_rows
        block = torch.empty(per_block, self.embedding_dim, dtype=self.source.dtype)
        fd = self.source.open()
        try:
            read = None  # the block in `block` now
            for k, i in enumerate(unique.tolist()):  # sorted: rows of one block come together
                first = i - i % per_block
                if read != first:
                    n = min(per_block, self.num_embeddings - first)
                    self.source.read_blocks(fd, first, block[:n])
                    read = first
                rows[k] = block[i - first]
        finally:
            os.close(fd)
        return rows.to(self.device)[inverse.to(self.device)]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows read on demand"


def digest_block_rows(row_bytes: int, block_bytes: int) -> int:
    """Rows one digest covers: about `block_bytes`, at least a row."""
    return max(1, block_bytes // max(row_bytes, 1))


def head_chunk_rows(rows: int, row_bytes: int, block: int, chunk_bytes: int) -> int:
    """Rows of the head read at a time: whole blocks of `block` rows (each checked as it is
    read, RowSource.read_blocks) filling at most `chunk_bytes`, at least one block."""
    blocks = max(1, chunk_bytes // (block * row_bytes))
    return min(rows, blocks * block)


def head_block_bytes(budget: int) -> int:
    """The head's digest blocks under a budget: none larger than its chunk."""
    return min(DIGEST_BLOCK_BYTES, budget // 8)


def head_chunk_bytes(budget: int) -> int:
    """The streamed head's buffer size for a budget: at most an eighth of it."""
    return min(HEAD_CHUNK_BYTES, budget // 8)


class StreamedHead(nn.Module):
    """nn.Linear (no bias) whose weight is read from disk in row chunks for every forward."""

    def __init__(self, source: RowSource, *, device, chunk_bytes: int = HEAD_CHUNK_BYTES):
        super().__init__()
        self.source = source
        self.out_features, self.in_features = source.shape
        self.device = torch.device(device)
        self.chunk_rows = head_chunk_rows(self.out_features, source.row_bytes,
                                          source.block_rows, chunk_bytes)
        self.buffer = torch.empty(self.chunk_rows, self.in_features, dtype=source.dtype)
        self.bytes_read = 0
        self.metrics = None  # runtime.metrics.Metrics: the head's reads count toward the token

    @property
    def buffer_bytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(*x.shape[:-1], self.out_features, dtype=x.dtype, device=x.device)
        fd = self.source.open()
        read_s = 0.0
        try:
            for start in range(0, self.out_features, self.chunk_rows):
                stop = min(start + self.chunk_rows, self.out_features)
                chunk = self.buffer[:stop - start]
                t0 = time.perf_counter()
                self.source.read_blocks(fd, start, chunk)
                read_s += time.perf_counter() - t0
                w = chunk.to(self.device, non_blocking=False)
                y[..., start:stop] = nn.functional.linear(x, w.to(x.dtype))
            nbytes = self.out_features * self.source.row_bytes
            self.bytes_read += nbytes
            if self.metrics is not None:  # read in line with compute: its wait is a stall
                self.metrics.add_expert(nbytes, nbytes, read_s, 0.0)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"streamed in chunks of {self.chunk_rows} rows")


def offload_rest(model: nn.Module, f: EndorFile, *, device,
                 budget: int) -> tuple[frozenset[str], int]:
    """Put OnDemandEmbedding / StreamedHead in place of the model's input embedding and LM head
    (tied or not) when their weights are dense 2-D tensors of the rest shard `f`. Returns (the
    state-dict names no longer to load, the bytes they keep resident: the head's buffer, at most
    an eighth of `budget` and HEAD_CHUNK_BYTES)."""
    names = {n for n in f.keys()}
    skipped, resident = set(), 0
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    params = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    emb_name = params.get(id(embedding.weight)) if isinstance(embedding, nn.Embedding) else None
    head_name = params.get(id(head.weight)) if isinstance(head, nn.Linear) and \
        head.bias is None else None
    # On the meta device transformers has not tied the pair yet (two parameters): its list of
    # tied keys says so. Missing that, the embedding left alone and the head, absent from the
    # shard, stayed on the meta device.
    ties = getattr(model, "all_tied_weights_keys", None) or {}
    tied = head is not None and embedding is not None and (
        getattr(head, "weight", None) is getattr(embedding, "weight", None) or
        ties.get(head_name) == emb_name or ties.get(emb_name) == head_name)
    # A tied pair is stored once, under either name.
    stored = {n: n if n in names else (emb_name if n == head_name else head_name)
              for n in (emb_name, head_name) if n} if tied else \
        {n: n for n in (emb_name, head_name) if n}
    # The head reads whole digest blocks: none larger than its chunk.
    block = head_block_bytes(budget)
    # A tied pair's one stored tensor is verified (read whole) once, for both of its users.
    by_stored = {s: row_source(f, s, block) for s in set(stored.values()) if s in names}
    sources = {n: by_stored.get(s) for n, s in stored.items()}
    if emb_name and sources.get(emb_name) is not None:
        model.set_input_embeddings(OnDemandEmbedding(
            sources[emb_name], device=device, padding_idx=embedding.padding_idx))
        skipped.add(emb_name)
    if head_name and sources.get(head_name) is not None:
        streamed = StreamedHead(sources[head_name], device=device,
                                chunk_bytes=head_chunk_bytes(budget))
        model.set_output_embeddings(streamed)
        skipped.add(head_name)
        resident += streamed.buffer_bytes
    if tied and len(skipped) == 2:
        skipped |= set(stored.values())
    return frozenset(skipped), resident


def rest_size(f: EndorFile) -> int:
    """Dense bytes of every tensor of the rest shard: what it holds resident in full."""
    return sum(stored_nbytes(f, n) for n in f.keys())
