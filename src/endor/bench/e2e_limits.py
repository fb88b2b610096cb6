"""The link's limits beside `endor bench e2e`'s systems: the dense shards read from disk
(O_DIRECT, cold), and copied host to device (pinned)."""

from __future__ import annotations

import torch

from ..runtime.reader import ShardReader, aligned_buffer
from . import harness


def disk_row(files, opts) -> dict:
    reader = ShardReader()
    buf = aligned_buffer(max(f.stat().st_size for f in files))
    total = sum(f.stat().st_size for f in files)

    def read_all():
        for f in files:
            reader.read_into(f, buf, f.stat().st_size)

    try:
        t = harness.measure(read_all, warmup=opts.warmup, repeat=opts.repeat,
                            setup=lambda: harness.evict_files(files))
    finally:
        reader.close()
    return {"system": "disk", "s_per_token": t.median_s, "min_s": t.min_s, "max_s": t.max_s,
            "n": t.n, "mb_read_per_token": total / 1e6, "gbps": t.gbps(total),
            "direct_io": reader.direct}


def h2d_row(files, opts) -> dict:
    """Every dense shard copied from pinned host memory to the GPU, one after the other: what a
    token costs when only the link moves bytes."""
    sizes = [f.stat().st_size for f in files]
    host = [torch.empty(n, dtype=torch.uint8, pin_memory=True) for n in sizes]
    for f, h in zip(files, host):
        h.copy_(torch.frombuffer(bytearray(f.read_bytes()), dtype=torch.uint8))
    device = torch.device(opts.device)
    target = torch.empty(max(sizes), dtype=torch.uint8, device=device)

    def copy_all():
        for h, n in zip(host, sizes):
            target[:n].copy_(h, non_blocking=True)

    t = harness.measure(copy_all, warmup=opts.warmup, repeat=opts.repeat, device=device)
    return {"system": "h2d", "s_per_token": t.median_s, "min_s": t.min_s, "max_s": t.max_s,
            "n": t.n, "mb_read_per_token": sum(sizes) / 1e6, "gbps": t.gbps(sum(sizes))}
