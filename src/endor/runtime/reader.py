"""Whole-file reads into aligned, reused buffers, bypassing the page cache (O_DIRECT).

A layer shard is one contiguous file: the runtime reads it whole, in large aligned chunks, into a
buffer it allocated once. O_DIRECT makes the disk DMA straight into that buffer (no copy through
the page cache, little CPU) and keeps a model larger than RAM from evicting everything else. Where
the filesystem refuses O_DIRECT (tmpfs, some network filesystems) the reader falls back to
buffered reads and records why, so benchmarks can say their reads were not direct."""

from __future__ import annotations

import errno
import os
import threading

import torch

ALIGN = 4096  # O_DIRECT needs buffer address, file offset and length aligned to the block size
CHUNK = 8 * 2**20  # one request; a multiple of ALIGN
DEPTH = 4  # requests in flight: the device queue stays full while a reader thread waits for a CPU


def round_up(n: int, multiple: int = ALIGN) -> int:
    return -(-n // multiple) * multiple


def aligned_buffer(nbytes: int, *, pin: bool = False) -> torch.Tensor:
    """A uint8 CPU tensor of round_up(nbytes) bytes whose data starts on an ALIGN boundary
    (pinned for fast, asynchronous host-to-device copies when `pin`)."""
    size = round_up(max(nbytes, 1))
    raw = torch.empty(size + ALIGN, dtype=torch.uint8, pin_memory=pin)
    skip = (-raw.data_ptr()) % ALIGN
    return raw[skip:skip + size]


class ShardReader:
    """Reads whole files into aligned buffers, `depth` chunk requests in flight (threads blocked
    in the kernel, no CPU), so a busy CPU delaying one thread leaves the disk no gap. Thread-safe;
    one instance serves every shard. close() joins its I/O threads."""

    def __init__(self, *, direct: bool = True, depth: int = DEPTH):
        if not isinstance(depth, int) or depth < 1:
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
        return os.open(path, os.O_RDONLY), False

    def read_into(self, path, buf: torch.Tensor, nbytes: int) -> int:
        """Read the first `nbytes` of `path` (its whole size) into `buf` (from aligned_buffer,
        at least round_up(nbytes) long). Returns bytes read; a short file is an OSError."""
        if buf.numel() < round_up(nbytes) or buf.data_ptr() % ALIGN:
            raise ValueError("buffer is too small or not aligned; allocate it with aligned_buffer")
        view = memoryview(buf.numpy())
        fd, direct = self._open(os.fspath(path))
        try:
            try:
                done = self._read_all(fd, view, nbytes)
            except OSError as e:
                if not (direct and e.errno == errno.EINVAL):
                    raise
                # Some filesystems accept the O_DIRECT open but refuse the read itself.
                self._fall_back(f"the filesystem refused an O_DIRECT read of {path}")
                os.close(fd)
                fd = os.open(os.fspath(path), os.O_RDONLY)
                done = self._read_all(fd, view, nbytes)
        finally:
            os.close(fd)
        if done < nbytes:
            raise OSError(errno.EIO, f"short read: got {done} of {nbytes} bytes (the file shrank "
                                     "after the checkpoint was opened)", os.fspath(path))
        return nbytes

    def _read_all(self, fd: int, view: memoryview, nbytes: int) -> int:
        end = round_up(nbytes)
        starts = range(0, end, CHUNK)
        if self.depth == 1 or len(starts) <= 1:
            return _read_range(fd, view, 0, end, nbytes)
        with self._lock:
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor
                self._pool = ThreadPoolExecutor(self.depth, thread_name_prefix="endor-io")
            pool = self._pool
        futures = [pool.submit(_read_range, fd, view, s, min(s + CHUNK, end), nbytes)
                   for s in starts]
        results = []
        for f in futures:  # every request finishes before fd is closed, errors or not
            try:
                results.append(f.result())
            except OSError as e:
                results.append(e)
        errors = [r for r in results if isinstance(r, OSError)]
        if errors:
            raise errors[0]
        return sum(results)


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
