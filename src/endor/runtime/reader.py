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
CHUNK = 32 * 2**20  # large reads keep the device queue full; a multiple of ALIGN


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
    """Reads whole files into aligned buffers. Thread-safe; one instance serves every shard."""

    def __init__(self, *, direct: bool = True):
        self._want_direct = direct and hasattr(os, "O_DIRECT")
        self._lock = threading.Lock()
        self.direct = self._want_direct
        self.fallback_reason = None if self._want_direct else (
            "disabled" if not direct else "O_DIRECT is not available on this OS")

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
                done = self._read_loop(fd, view, nbytes)
            except OSError as e:
                if not (direct and e.errno == errno.EINVAL):
                    raise
                # Some filesystems accept the O_DIRECT open but refuse the read itself.
                self._fall_back(f"the filesystem refused an O_DIRECT read of {path}")
                os.close(fd)
                fd = os.open(os.fspath(path), os.O_RDONLY)
                done = self._read_loop(fd, view, nbytes)
        finally:
            os.close(fd)
        if done < nbytes:
            raise OSError(errno.EIO, f"short read: got {done} of {nbytes} bytes (the file shrank "
                                     "after the checkpoint was opened)", os.fspath(path))
        return nbytes

    @staticmethod
    def _read_loop(fd: int, view: memoryview, nbytes: int) -> int:
        done = 0
        end = round_up(nbytes)
        while done < nbytes:
            want = min(CHUNK, end - done)
            got = os.preadv(fd, [view[done:done + want]], done)
            if got == 0:
                break
            # A short read before the end leaves `done` unaligned; an O_DIRECT fd then answers
            # EINVAL and read_into retries the file buffered.
            done += got
        return min(done, nbytes)
