"""Read speed of whole shards through runtime.reader.ShardReader, by request size (CHUNK, also
the span each digest covers), with hashing on: the measurement behind reader.CHUNK.

    python scripts/read-span-speed.py [--dir D] [--shards 12] [--mib 34] [--rounds 3]

Writes the shards (random bytes) into D once, then reads them all, cold (O_DIRECT, or buffered
with the pages dropped), four slots in flight like the runtime's, each request size in turn,
rounds interleaved; prints GB/s per round and the median."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import endor.runtime.reader as reader


def read_all(files, size, chunk, slots=4):
    reader.CHUNK = chunk
    rd = reader.ShardReader(depth=reader.DEPTH)
    try:
        bufs = [reader.aligned_buffer(size) for _ in range(slots)]
        reader.evict_files(files)
        t0 = time.perf_counter()
        pending = []
        for i, f in enumerate(files):
            if len(pending) == slots:
                pending.pop(0).result()
            pending.append(rd.start(f, bufs[i % slots], size, digest=True))
        for p in pending:
            p.result()
        return len(files) * size / (time.perf_counter() - t0) / 1e9
    finally:
        rd.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="where to write the shards (default: a temp dir)")
    ap.add_argument("--shards", type=int, default=12)
    ap.add_argument("--mib", type=int, default=34, help="shard size in MiB")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--chunks-mib", default="4,8,16,256")
    args = ap.parse_args()
    directory = args.dir or tempfile.mkdtemp(prefix="endor-read-span-")
    size = args.mib * 2**20
    files = []
    for i in range(args.shards):
        path = os.path.join(directory, f"shard{i}.bin")
        if not os.path.exists(path) or os.path.getsize(path) != size:
            with open(path, "wb") as f:
                f.write(os.urandom(size))
        files.append(path)
    chunks = [int(c) * 2**20 for c in args.chunks_mib.split(",")]
    seen = {c: [] for c in chunks}
    for r in range(args.rounds):
        for c in chunks:
            seen[c].append(read_all(files, size, c))
            print(f"round {r}: {c >> 20} MiB requests {seen[c][-1]:.2f} GB/s", flush=True)
    for c in chunks:
        print(f"{c >> 20} MiB: median {statistics.median(seen[c]):.2f} GB/s "
              f"({', '.join(f'{g:.2f}' for g in seen[c])}); load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
