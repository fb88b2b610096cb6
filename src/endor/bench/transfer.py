"""`endor bench transfer`: the limits of the links weights cross. Disk: sequential reads of a test
file with the page cache bypassed (O_DIRECT into an aligned buffer), buffered after evicting the
file's pages (cold) and buffered from the page cache (warm), at several block sizes; host memcpy
on one and on all threads; on CUDA, pinned vs pageable host<->device copies.

Each read streams the whole file through one block-sized buffer, as a streaming runtime does with
its staging buffer: the runtime's kind (runtime.reader.host_region, huge pages), and for
comparison ordinary 4 KiB pages (mode direct_small_pages).
GB/s is bytes moved per second (1e9), median after warm-up."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from ..runtime.reader import host_region
from . import harness

NAME = "transfer"
MIB = 1 << 20
DEFAULT_SIZE_MIB, QUICK_SIZE_MIB = 1024, 64
DEFAULT_BLOCKS_MIB, QUICK_BLOCKS_MIB = [1, 4, 16], [1, 4]
DEFAULT_COPY_MIB, QUICK_COPY_MIB = [64, 256, 1024], [16, 64]
TABLE_COLUMNS = ["link", "mode", "block_mib", "size_mib", "threads", "gbps", "vs_memcpy",
                 "o_direct", "n"]


def add_arguments(parser) -> None:
    parser.add_argument("--dir", default=None,
                        help="where the test file goes (default: a temporary directory in the "
                             "current directory, i.e. on its disk); removed afterwards")
    parser.add_argument("--size-mib", type=int, default=None,
                        help=f"test file size (default {DEFAULT_SIZE_MIB}, --quick "
                             f"{QUICK_SIZE_MIB}); larger than the disk cache to mean anything")
    parser.add_argument("--blocks-mib", type=harness.int_list, default=None,
                        help=f"read block sizes (default {DEFAULT_BLOCKS_MIB})")
    parser.add_argument("--queue-depth", type=int, default=4,
                        help="also time O_DIRECT reads with this many in flight (default 4; "
                             "1 turns it off)")
    parser.add_argument("--copy-mib", type=harness.int_list, default=None,
                        help=f"host<->device copy sizes on CUDA (default {DEFAULT_COPY_MIB})")


# --- reading a file with the page cache bypassed -------------------------------------------------

def open_direct(path) -> int | None:
    """A file descriptor that reads `path` with O_DIRECT, or None where the OS or filesystem
    refuses it (tmpfs, macOS): callers fall back to buffered reads and say so."""
    if not hasattr(os, "O_DIRECT"):
        return None
    try:
        return os.open(os.fspath(path), os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return None
        raise


def pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill `view` from `offset`, looping over short reads; returns the bytes read (fewer only
    at end of file). With O_DIRECT, `view` and `offset` must be block-aligned (4096)."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            break
        done += n
    return done


def stream_file(fd: int, buffer, block_size: int) -> int:
    """Read the file behind `fd` front to back through `buffer[:block_size]`; returns bytes."""
    view = memoryview(buffer)[:block_size]
    total = 0
    while True:
        n = pread_into(fd, view, total)
        total += n
        if n < block_size:
            return total


def stream_file_parallel(fd: int, buffer, block_size: int, pool, depth: int) -> int:
    """Like stream_file with `depth` reads in flight on `pool` (the queue depth an NVMe drive
    needs to reach its bandwidth), each through its own slot of `buffer` (depth blocks long)."""
    nblocks = max(1, -(-os.fstat(fd).st_size // block_size))
    slots = [memoryview(buffer)[i * block_size:(i + 1) * block_size] for i in range(depth)]

    def worker(i: int) -> int:
        return sum(pread_into(fd, slots[i], k * block_size) for k in range(i, nblocks, depth))
    return sum(pool.map(worker, range(depth)))


def direct_io_works(path, buffer) -> bool:
    """Open and read one block with O_DIRECT: some filesystems accept the flag and then fail
    the read."""
    fd = open_direct(path)
    if fd is None:
        return False
    try:
        pread_into(fd, memoryview(buffer)[:4096], 0)
        return True
    except OSError as e:
        if e.errno == errno.EINVAL:
            return False
        raise
    finally:
        os.close(fd)


def write_test_file(path: Path, nbytes: int, *, seed: int = 0) -> None:
    """Random bytes (nothing on the way can compress them), flushed to the disk so the page cache
    can drop them."""
    g = torch.Generator().manual_seed(seed)
    chunk = torch.randint(0, 256, (min(nbytes, 16 * MIB),), dtype=torch.uint8, generator=g)
    data = chunk.numpy().tobytes()
    with open(path, "wb") as f:
        left = nbytes
        while left:
            left -= f.write(data[:left])
        f.flush()
        os.fsync(f.fileno())


# --- the benchmark -------------------------------------------------------------------------------

def _disk_rows(path: Path, size: int, blocks_mib: list[int], depth: int, *, warmup: int,
               repeat: int) -> list:
    # Huge pages as the runtime's read buffers have, and 4 KiB pages to show what they are worth.
    buffer = host_region(max(blocks_mib) * MIB * max(1, depth))
    small_pages = host_region(max(blocks_mib) * MIB, huge_pages=False)
    direct = direct_io_works(path, buffer)
    pool = ThreadPoolExecutor(depth) if depth > 1 else None
    rows = []
    for block_mib in blocks_mib:
        block = block_mib * MIB

        def read(flags: int, parallel: bool = False, into=buffer) -> None:
            fd = os.open(path, os.O_RDONLY | flags)
            try:
                got = (stream_file_parallel(fd, into, block, pool, depth) if parallel
                       else stream_file(fd, into, block))
            finally:
                os.close(fd)
            assert got == size, (got, size)

        evicted = []
        evict = lambda: evicted.append(harness.evict_page_cache(path))  # noqa: E731
        cases = [
            # O_DIRECT skips the page cache; evicting too keeps the fallback honest.
            ("direct", lambda: read(os.O_DIRECT if direct else 0), evict),
            ("direct_small_pages", lambda: read(os.O_DIRECT if direct else 0, into=small_pages),
             evict),
            *([(f"direct_qd{depth}", lambda: read(os.O_DIRECT if direct else 0, True), evict)]
              if pool else []),
            ("buffered_cold", lambda: read(0), evict),
            ("buffered_warm", lambda: read(0), None),
        ]
        for mode, fn, setup in cases:
            evicted.clear()
            stats = harness.measure(fn, warmup=max(1, warmup) if setup is None else warmup,
                                    repeat=repeat, setup=setup)
            rows.append({"link": "disk", "mode": mode, "block_mib": block_mib,
                         "size_mib": size // MIB, "queue_depth": depth if "_qd" in mode else 1,
                         "o_direct": direct and mode.startswith("direct"),
                         "cache_evicted": all(evicted) if setup else False,
                         "gbps": stats.gbps(size), **stats.as_dict()})
    if pool:
        pool.shutdown()
    return rows


def _memcpy_rows(size: int, *, warmup: int, repeat: int) -> list:
    src = torch.randint(0, 256, (size,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    threads = torch.get_num_threads()
    rows = []
    try:
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            stats = harness.measure(lambda: dst.copy_(src), warmup=warmup, repeat=repeat)
            rows.append({"link": "host_memcpy", "mode": "copy", "threads": n,
                         "size_mib": size // MIB, "gbps": stats.gbps(size), **stats.as_dict()})
    finally:
        torch.set_num_threads(threads)
    return rows


def _host_device_rows(sizes_mib: list[int], *, warmup: int, repeat: int) -> list:
    device = torch.device("cuda")
    rows = []
    for size_mib in sizes_mib:
        size = size_mib * MIB
        on_device = torch.empty(size, dtype=torch.uint8, device=device)
        pageable_s = {}
        for memory in ("pageable", "pinned"):
            host = torch.empty(size, dtype=torch.uint8, pin_memory=memory == "pinned")
            host.fill_(7)
            for direction, stats in _copy_stats(on_device, host, warmup=warmup,
                                                repeat=repeat).items():
                if memory == "pageable":
                    pageable_s[direction] = stats.median_s
                rows.append({"link": "host_device", "mode": f"{direction} {memory}",
                             "direction": direction, "memory": memory, "size_mib": size_mib,
                             "gbps": stats.gbps(size),
                             "vs_pageable": pageable_s[direction] / stats.median_s,
                             **stats.as_dict()})
            del host  # freed before the next (pinned) buffer is allocated
        del on_device
    return rows


def _copy_stats(on_device: torch.Tensor, host: torch.Tensor, *, warmup: int,
                repeat: int) -> dict:
    """{"h2d": stats, "d2h": stats}: copies between two same-size buffers. The buffers are
    parameters here, not names the caller deletes after building these closures."""
    copies = {"h2d": lambda: on_device.copy_(host, non_blocking=True),
              "d2h": lambda: host.copy_(on_device, non_blocking=True)}
    return {direction: harness.measure(fn, warmup=warmup, repeat=repeat,
                                       device=on_device.device)
            for direction, fn in copies.items()}


def run(*, size_mib, blocks_mib, copy_mib, queue_depth, dir, quick, warmup, repeat) -> dict:
    load_before = harness.system_load()
    size = (size_mib or (QUICK_SIZE_MIB if quick else DEFAULT_SIZE_MIB)) * MIB
    blocks = blocks_mib or (QUICK_BLOCKS_MIB if quick else DEFAULT_BLOCKS_MIB)
    copies = copy_mib or (QUICK_COPY_MIB if quick else DEFAULT_COPY_MIB)
    if size <= 0 or min(blocks) <= 0 or min(copies) <= 0 or queue_depth <= 0:
        raise ValueError("--size-mib, --blocks-mib, --copy-mib and --queue-depth must be "
                         "positive")
    parent = Path(dir) if dir else Path.cwd()
    if not parent.is_dir():
        raise ValueError(f"--dir {parent} is not a directory")
    workdir = Path(tempfile.mkdtemp(prefix=".endor-bench-transfer-", dir=parent))
    try:
        path = workdir / "test.bin"
        write_test_file(path, size)
        rows = _disk_rows(path, size, blocks, queue_depth, warmup=warmup,
                          repeat=repeat)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    memcpy = _memcpy_rows(min(size, 256 * MIB), warmup=warmup, repeat=repeat)
    best_memcpy = max(r["gbps"] for r in memcpy)
    for row in rows:
        row["vs_memcpy"] = row["gbps"] / best_memcpy
    rows += memcpy
    if torch.cuda.is_available():
        rows += _host_device_rows(copies, warmup=warmup, repeat=repeat)
    params = {"load_avg": {"before": load_before, "after": harness.system_load()},
              "dir": str(parent), "size_mib": size // MIB, "blocks_mib": blocks,
              "copy_mib": copies if torch.cuda.is_available() else None,
              "queue_depth": queue_depth,
              "o_direct": any(r.get("o_direct") for r in rows), "quick": quick,
              "warmup": warmup, "repeat": repeat}
    return harness.envelope(NAME, params, rows, table_columns=TABLE_COLUMNS)
