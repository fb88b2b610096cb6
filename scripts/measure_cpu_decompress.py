"""Measure the CPU decompressor against a dense copy and the numpy baseline (the targets of the CPU
backend): a 64M-element fp16 tensor at 50% random sparsity by default. Prints medians after
warm-up. Usage: .venv/bin/python scripts/measure_cpu_decompress.py [--numel N] [--isa avx512]"""

import argparse
import json

import numpy as np
import torch

import endor
from endor.bench.harness import machine_info, measure
from endor.kernels import cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--numel", type=int, default=64 * 2**20)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--isa", default=None, help="scalar | avx2 | avx512 (default: best)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-huge-pages", action="store_true",
                   help="do not madvise the output for transparent huge pages")
    p.add_argument("--repeat", type=int, default=11)
    p.add_argument("--numpy-repeat", type=int, default=3)
    args = p.parse_args()

    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(args.numel, generator=g).to(dtype)
    dense[torch.rand(args.numel, generator=g) < args.sparsity] = 0
    et = endor.compress(dense)
    nbytes = dense.numel() * dense.element_size()
    reused = torch.empty_like(dense)
    huge = not args.no_huge_pages

    def decompress_fresh():
        out = torch.empty(et.numel, dtype=et.dtype)
        cpu.decompress(et, out, isa=args.isa, threads=args.threads, huge_pages=huge)
        return out

    def decompress_out():
        cpu.decompress(et, reused, isa=args.isa, threads=args.threads, huge_pages=huge)

    ints = np.dtype(np.int16 if dense.element_size() == 2 else np.int32)
    bitmap_np = et.bitmap.numpy()
    values_np = et.values.view(torch.int16 if ints == np.int16 else torch.int32).numpy()

    def numpy_baseline():
        mask = np.unpackbits(bitmap_np, bitorder="little")[: et.numel].astype(bool)
        out = np.zeros(et.numel, dtype=ints)
        out[mask] = values_np
        return out

    assert torch.equal(decompress_fresh().view(torch.int16 if ints == np.int16 else torch.int32),
                       dense.view(torch.int16 if ints == np.int16 else torch.int32))
    stats = {
        "copy_fresh": measure(lambda: torch.empty_like(dense).copy_(dense), repeat=args.repeat),
        "copy_out": measure(lambda: reused.copy_(dense), repeat=args.repeat),
        "decompress_fresh": measure(decompress_fresh, repeat=args.repeat),
        "decompress_out": measure(decompress_out, repeat=args.repeat),
        "numpy_baseline": measure(numpy_baseline, repeat=args.numpy_repeat),
    }
    report = {
        "numel": args.numel, "dtype": args.dtype, "sparsity": args.sparsity,
        "isa": args.isa or cpu.supported_isas()[-1], "torch_threads": torch.get_num_threads(),
        "huge_pages": huge,
        "compressed_bytes": et.nbytes, "dense_bytes": nbytes,
        "median_ms": {k: round(s.median_s * 1e3, 2) for k, s in stats.items()},
        "dense_gbps": {k: round(s.gbps(nbytes), 2) for k, s in stats.items()},
        "ratio_decode_vs_copy_fresh": round(stats["decode_fresh"].median_s
                                            / stats["copy_fresh"].median_s, 3),
        "ratio_decode_vs_copy_out": round(stats["decode_out"].median_s
                                          / stats["copy_out"].median_s, 3),
        "ratio_decompress_out_vs_copy_fresh": round(stats["decompress_out"].median_s
                                                / stats["copy_fresh"].median_s, 3),
        "speedup_vs_numpy": round(stats["numpy_baseline"].median_s
                                  / stats["decompress_fresh"].median_s, 1),
        "machine": machine_info(),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
