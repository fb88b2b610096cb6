"""`endor bench decode`: GB/s of every available Endor decoder against a copy of the dense tensor
measured in the same run (fresh output, and into a reused buffer), and against the naive numpy
decoder (unpackbits + boolean-mask assignment). On CUDA also (bytes read + written) / time
against the HBM peak and a device-to-device copy.

GB/s is dense bytes produced per second; `ratio_vs_copy` is decode time / copy time with the same
kind of output (fresh with fresh, `out=` with the reused buffer)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..format import compress, spec
from ..format.equal import bit_equal
from ..kernels import backends, decompress
from . import harness

NAME = "decode"
DEFAULT_SHAPE = [8192, 8192]
QUICK_SHAPE = [1024, 1024]
HEADLINE = (torch.float16, 0.5)
TABLE_COLUMNS = ["device", "dtype", "sparsity", "method", "output", "gbps", "ratio_vs_copy",
                 "speedup_vs_numpy", "pct_of_hbm", "n"]


def add_arguments(parser) -> None:
    parser.add_argument("--shape", type=harness.int_list, default=None,
                        help=f"tensor shape, comma-separated (default {DEFAULT_SHAPE} = 64M "
                             f"elements, --quick {QUICK_SHAPE})")
    parser.add_argument("--dtypes", type=harness.dtype_list, default="fp16,bf16,fp32")
    parser.add_argument("--sparsities", type=harness.float_list, default="0.5,0.7,0.9")
    parser.add_argument("--backends", default=None,
                        help="comma-separated decoder backends (default: every available one)")
    parser.add_argument("--numpy", choices=("headline", "all", "none"), default="headline",
                        help="where to time the numpy baseline: only float16 at 50%% "
                             "(default), every case, or nowhere")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the CPU, plus CUDA when there is one")
    parser.add_argument("--hbm-gbps", type=float, default=4800.0,
                        help="device memory peak for pct_of_hbm (default 4800, H200)")
    parser.add_argument("--seed", type=int, default=0)


def numpy_decoder(et):
    """The naive CPU decoder users write first: numpy unpackbits + boolean-mask assignment.
    Returns a no-argument function producing the dense tensor."""
    int_dtype = spec.INT_VIEW[et.dtype]
    bitmap = et.bitmap.cpu().numpy()
    values = et.values.cpu().view(int_dtype).numpy()
    numel, shape = et.numel, et.shape

    def decode() -> torch.Tensor:
        mask = np.unpackbits(bitmap, count=numel, bitorder="little").view(bool)
        out = np.zeros(numel, dtype=values.dtype)
        out[mask] = values
        return torch.from_numpy(out).view(et.dtype).view(shape)
    return decode


def _devices(choice: str) -> list[torch.device]:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device here")
    if choice == "auto":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available()
                                        else [])
    return [torch.device(choice)]


# GPU kernels that also run on the CPU only through an interpreter (for tests): timing them there
# measures the interpreter, so they are left out unless named in --backends.
INTERPRETED_ON_CPU = ("triton",)


def _backends(device: torch.device, wanted: list[str] | None) -> list[str]:
    found = backends()
    if wanted:
        unknown = sorted(set(wanted) - set(found))
        if unknown:
            raise ValueError(f"unknown backend(s) {unknown}; registered: {sorted(found)}")
    else:
        wanted = [n for n in found if not (device.type == "cpu" and n in INTERPRETED_ON_CPU)]
    return [name for name, b in found.items()
            if name in wanted and device.type in b.device_types and b.available()]


def _case(tensor, et, device, backend_names, *, with_numpy, hbm_gbps, warmup, repeat) -> list:
    """Every row of one (device, dtype, sparsity): copies, numpy, each backend fresh and out=."""
    dense = tensor.to(device)
    et = et.to(device)
    dense_bytes = dense.numel() * dense.element_size()
    read_bytes = sum(t.numel() * t.element_size() for t in (et.bitmap, et.values, et.tiles))
    reused = torch.empty_like(dense)
    timed = lambda fn: harness.measure(fn, warmup=warmup, repeat=repeat, device=device)  # noqa

    rows = [("copy", "fresh", timed(lambda: torch.empty_like(dense).copy_(dense)), 2 * dense_bytes),
            ("copy", "out", timed(lambda: reused.copy_(dense)), 2 * dense_bytes)]
    if with_numpy and device.type == "cpu":
        decode = numpy_decoder(et)
        if not bit_equal(decode(), tensor):
            raise RuntimeError("the numpy baseline did not decode bit-exactly")
        rows.append(("numpy", "fresh", timed(decode), read_bytes + dense_bytes))
    for name in backend_names:
        if not bit_equal(decompress(et, backend=name), tensor):
            raise RuntimeError(f"backend {name!r} did not decode bit-exactly on {device}")
        rows.append((name, "fresh", timed(lambda: decompress(et, backend=name)),
                     read_bytes + dense_bytes))
        rows.append((name, "out", timed(lambda: decompress(et, backend=name, out=reused)),
                     read_bytes + dense_bytes))

    copy = {output: stats for method, output, stats, _ in rows if method == "copy"}
    numpy_s = next((s.median_s for m, _, s, _ in rows if m == "numpy"), None)
    results = []
    for method, output, stats, moved in rows:
        rw_gbps = stats.gbps(moved)
        results.append({
            "device": device.type, "method": method, "output": output,
            "gbps": stats.gbps(dense_bytes), "rw_gbps": rw_gbps,
            "ratio_vs_copy": stats.median_s / copy[output].median_s,
            "speedup_vs_numpy": numpy_s / stats.median_s if numpy_s else None,
            "pct_of_hbm": 100 * rw_gbps / hbm_gbps if device.type == "cuda" else None,
            "dense_bytes": dense_bytes, "read_bytes": moved - dense_bytes,
            **stats.as_dict(),
        })
    return results


def run(args) -> dict:
    load_before = harness.system_load()
    shape = args.shape or (QUICK_SHAPE if args.quick else DEFAULT_SHAPE)
    if math.prod(shape) == 0:
        raise ValueError(f"--shape {shape} has no elements")
    wanted = [x.strip() for x in args.backends.split(",")] if args.backends else None
    devices = _devices(args.device)
    per_device = {d.type: _backends(d, wanted) for d in devices}
    results = []
    for dtype in args.dtypes:
        for sparsity in args.sparsities:
            tensor = harness.random_sparse(shape, dtype, sparsity, seed=args.seed)
            et = compress(tensor)
            with_numpy = args.numpy == "all" or (args.numpy == "headline"
                                                 and (dtype, sparsity) == HEADLINE)
            for device in devices:
                for row in _case(tensor, et, device, per_device[device.type],
                                 with_numpy=with_numpy, hbm_gbps=args.hbm_gbps,
                                 warmup=args.warmup, repeat=args.repeat):
                    results.append({"dtype": harness.dtype_name(dtype), "sparsity": sparsity,
                                    "numel": tensor.numel(), **row})
            del tensor, et
    params = {"load_avg": {"before": load_before, "after": harness.system_load()},
              "shape": list(shape), "dtypes": [harness.dtype_name(d) for d in args.dtypes],
              "sparsities": list(args.sparsities), "backends": per_device,
              "numpy": args.numpy, "hbm_gbps": args.hbm_gbps, "seed": args.seed,
              "quick": args.quick, "warmup": args.warmup, "repeat": args.repeat}
    return harness.envelope(NAME, params, results, table_columns=TABLE_COLUMNS)
