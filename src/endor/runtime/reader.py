"""Whole-file reads into aligned, reused buffers, bypassing the page cache (O_DIRECT).

A layer shard is one contiguous file: the runtime reads it whole, in large aligned chunks, into a
buffer it allocated once. O_DIRECT makes the disk DMA straight into that buffer (no copy through
the page cache, little CPU) and keeps a model larger than RAM from evicting everything else. Where
the filesystem refuses O_DIRECT (tmpfs, some network filesystems) the reader falls back to
buffered reads and records why, so benchmarks can say their reads were not direct.

Buffered reads (the fallback, or `direct=False` by choice) drop the file's pages from the page
cache once read (POSIX_FADV_DONTNEED): every read stays cold and the cache never holds the model,
so the RAM budget still means what it says.

The buffers sit on transparent huge pages (host_region): into 4 KiB pages, O_DIRECT ran at only
1.2-2.6 GB/s on our 2-core VM, below cold buffered reads (2.1-3.7); into huge pages it runs at
3.3-3.7 GB/s, above them (`endor bench transfer`, modes direct and direct_small_pages)."""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import xxhash

ALIGN = 4096  # O_DIRECT needs buffer address, file offset and length aligned to the block size
HUGE_PAGE = 2 * 2**20  # x86-64 and arm64 (4 KiB base pages) transparent huge page size
# A shard is read in requests of this size, and each request's bytes are hashed (span_digests) as
# soon as they land, while the later requests are still in flight: only the last span's hash
# follows the read, instead of the whole shard's. Request size hardly matters into huge pages
# (twelve 34 MiB shards, 4 slots, 2 cores, load < 2, two runs of 3 rounds,
# scripts/read-span-speed.py): 8 MiB 1.9-2.8 GB/s, 16 MiB 1.0-2.9, whole shards 1.9-2.7; into
# 4 KiB pages 8 MiB requests had cost 0.53 s/token against 0.37 for whole shards.
CHUNK = 8 * 2**20
# Requests in flight (each waits in the kernel, using no CPU): the next shards' reads queue
# behind the current one. What is in flight is also bounded by the stream's free read slots.
DEPTH = 4


def round_up(n: int, multiple: int = ALIGN) -> int:
    return -(-n // multiple) * multiple


def host_region(nbytes: int, *, huge_pages: bool = True) -> np.ndarray:
    """round_up(nbytes) bytes of private anonymous memory starting on a HUGE_PAGE boundary,
    advised for transparent huge pages where the OS has them (`huge_pages`). An O_DIRECT read pins
    every page of its buffer and hands the device a list of segments: 512x fewer, larger pages make
    each request cheaper and larger. Measured on our 2-core VM, twelve 51 MB shards, 4 requests in
    flight: 1.4-2.6 GB/s into 4 KiB pages, 3.3-3.7 GB/s into huge pages, dense shards alike."""
    size = round_up(max(nbytes, 1))
    # Private: a shared anonymous mapping is shmem, which huge pages cover only if shmem_enabled.
    region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if huge_pages and advice is not None:
        region.madvise(advice)
    raw = np.frombuffer(region, dtype=np.uint8)  # keeps `region` alive
    skip = (-raw.ctypes.data) % HUGE_PAGE
    return raw[skip:skip + size]


def aligned_buffer(nbytes: int, *, pin: bool = False, huge_pages: bool = True) -> torch.Tensor:
    """A uint8 CPU tensor of round_up(nbytes) bytes whose data starts on an ALIGN boundary: a
    host_region, or page-locked (CUDA) memory when `pin`, for fast asynchronous host-to-device
    copies."""
    if not pin:
        return torch.from_numpy(host_region(nbytes, huge_pages=huge_pages))
    size = round_up(max(nbytes, 1))
    raw = torch.empty(size + ALIGN, dtype=torch.uint8, pin_memory=True)
    skip = (-raw.data_ptr()) % ALIGN
    return raw[skip:skip + size]


def span_digests(view: memoryview, nbytes: int) -> tuple[int, ...]:
    """The digest a shard image is checked by: XXH3-64 of each CHUNK-sized span of the first
    `nbytes` of `view` (the reader's requests), so each span can be hashed when it lands."""
    return tuple(_span_digest(view, start, nbytes) for start in _span_starts(nbytes))


def _span_starts(nbytes: int) -> range:
    return range(0, round_up(nbytes), CHUNK) if nbytes else range(0, 1)


def _span_digest(view: memoryview, start: int, nbytes: int) -> int:
    return xxhash.xxh3_64_intdigest(view[start:min(start + CHUNK, nbytes)])


class PendingRead:
    """A whole-file read in flight. result() waits for it (falling back to a buffered read if
    O_DIRECT was refused mid-way), closes the file and returns the bytes read, or raises.

    With `digest`, result() hashes each request's span (span_digests) as soon as it lands, in
    the thread that waits for the read, while the later requests are still in flight: the check
    overlaps the shard's own reading instead of following it, and the I/O threads only read
    (hashing there kept requests from being issued: the dense pipeline's reads ran 6% slower).
    `digest` (a tuple, one digest per span) and `digest_s` (seconds spent hashing) are set by
    the time result() returns."""

    def __init__(self, reader: ShardReader, path: str, view: memoryview, nbytes: int,
                 digest: bool = False):
        self._reader, self.path, self._view, self.nbytes = reader, path, view, nbytes
        self._fd = None
        self._futures = []
        self._error = None
        self.started = self.finished = None  # perf_counter of the first and last request
        self._want_digest = digest
        self.digest: tuple[int, ...] | None = None
        self.digest_s = 0.0
        try:
            self._fd, self._direct = reader._open(path)
            self._futures = reader._submit(self._fd, view, nbytes, self)
        except OSError as e:  # raised by result(), in the thread that waits for the data
            self._error = e

    def _mark(self, t0: float, t1: float) -> None:
        # Called from I/O threads; min/max under the GIL are race-free enough for a timing.
        self.started = t0 if self.started is None else min(self.started, t0)
        self.finished = t1 if self.finished is None else max(self.finished, t1)

    def _hash(self) -> None:
        t0 = time.perf_counter()
        self.digest = span_digests(self._view, self.nbytes)
        self.digest_s = time.perf_counter() - t0

    def result(self) -> int:
        try:
            if self._error is not None:
                raise self._error
            done, errors, spans, spent = 0, [], [], 0.0
            # Every request ends before the fd is closed, errors or not.
            for start, f in zip(_span_starts(self.nbytes), self._futures):
                try:
                    done += f.result()
                except OSError as e:
                    errors.append(e)
                if self._want_digest and not errors:
                    t0 = time.perf_counter()
                    spans.append(_span_digest(self._view, start, self.nbytes))
                    spent += time.perf_counter() - t0
            if self._want_digest and not errors and done >= self.nbytes:
                self.digest, self.digest_s = tuple(spans), spent
            if errors:
                if not (self._direct and errors[0].errno == errno.EINVAL):
                    raise errors[0]
                # Some filesystems accept the O_DIRECT open but refuse the read itself.
                self._reader._fall_back(f"the filesystem refused an O_DIRECT read of {self.path}")
                os.close(self._fd)
                self._fd, self._direct = os.open(self.path, os.O_RDONLY), False
                t0 = time.perf_counter()
                done = _read_range(self._fd, self._view, 0, round_up(self.nbytes), self.nbytes)
                self._mark(t0, time.perf_counter())
                if self._want_digest:
                    self._hash()
        finally:
            if self._fd is not None:
                if not self._direct:
                    _drop_cached(self._fd)
                os.close(self._fd)
                self._fd = None
        if done < self.nbytes:
            raise OSError(errno.EIO, f"short read: got {done} of {self.nbytes} bytes (the file "
                                     "shrank after the checkpoint was opened)", self.path)
        return self.nbytes


class ShardReader:
    """Reads whole files into aligned buffers, `depth` chunk requests in flight (threads blocked
    in the kernel, no CPU). start() returns at once, so the next shard's requests queue behind
    the current one's and the device never idles between shards or while a thread waits for a
    CPU. Thread-safe; one instance serves every shard. close() joins its I/O threads."""

    def __init__(self, *, direct: bool = True, depth: int = DEPTH):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"depth must be a positive integer, got {depth!r}")
        self._want_direct = direct and hasattr(os, "O_DIRECT")
        self._lock = threading.Lock()
        self.depth = depth
        self._pool = None
        self.direct = self._want_direct
        self.fallback_reason = None if self._want_direct else (
            "disabled" if not direct else "O_DIRECT is not available on this OS")

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _fall_back(self, reason: str) -> None:
        with self._lock:
            if self.direct:
                self.direct = False
                self.fallback_reason = reason

    def _open(self, path) -> tuple[int, bool]:
        if self.direct:
            try:
                return os.open(path, os.O_RDONLY | os.O_DIRECT), True
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                self._fall_back(f"the filesystem refused O_DIRECT when opening {path}")
        fd = os.open(path, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        return fd, False

    def _submit(self, fd: int, view: memoryview, nbytes: int, pending: PendingRead) -> list:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.depth, thread_name_prefix="endor-io")
            pool = self._pool
        end = round_up(nbytes)
        starts = _span_starts(nbytes)
        return [pool.submit(_timed_range, fd, view, s, min(s + CHUNK, end), nbytes, pending)
                for s in starts]

    def start(self, path, buf: torch.Tensor, nbytes: int, *, digest: bool = False) -> PendingRead:
        """Begin reading the first `nbytes` of `path` (its whole size) into `buf` (from
        aligned_buffer, at least round_up(nbytes) long); errors surface in result(). `digest`:
        result() hashes each span as it lands (PendingRead.digest)."""
        if buf.numel() < round_up(nbytes) or buf.data_ptr() % ALIGN:
            raise ValueError("buffer is too small or not aligned; allocate it with aligned_buffer")
        return PendingRead(self, os.fspath(path), memoryview(buf.numpy()), nbytes, digest)

    def read_into(self, path, buf: torch.Tensor, nbytes: int) -> int:
        """start(...).result(): read the file whole, now. Returns bytes read."""
        return self.start(path, buf, nbytes).result()


def _drop_cached(fd: int) -> bool:
    """Evict a file's pages from the page cache: the next read of it is cold again. False where
    the OS offers no way."""
    if not hasattr(os, "posix_fadvise"):
        return False
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    return True


def evict_page_cache(path) -> bool:
    """Drop `path`'s pages from the OS page cache so the next read is cold. Returns False where the
    OS offers no way (then reads may be warm: callers record it)."""
    fd = os.open(os.fspath(path), os.O_RDONLY)
    try:
        return _drop_cached(fd)
    finally:
        os.close(fd)


def evict_files(paths) -> bool:
    """evict_page_cache for each path (all of them, even after a failure); True if all went."""
    return all([evict_page_cache(p) for p in paths])


def _timed_range(fd, view, start, stop, nbytes, pending: PendingRead) -> int:
    t0 = time.perf_counter()
    try:
        return _read_range(fd, view, start, stop, nbytes)
    finally:
        pending._mark(t0, time.perf_counter())


def _read_range(fd: int, view: memoryview, start: int, stop: int, nbytes: int) -> int:
    """Read file bytes [start, min(stop, nbytes)) into view[start:...]; returns the count. Each
    request is [pos, stop) with stop aligned, so with O_DIRECT only the last one, at the end of
    the file, comes back short."""
    pos, limit = start, min(stop, nbytes)
    while pos < limit:
        got = os.preadv(fd, [view[pos:stop]], pos)
        if got == 0:
            break
        pos += got  # a short read before the end makes pos unaligned: O_DIRECT then says EINVAL
    return min(pos, limit) - start
