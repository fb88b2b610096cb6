"""`endor bench decompress`: GB/s of every available Endor decompressor against a copy of the
dense tensor measured in the same run (fresh output, and into a reused buffer), and against the
naive numpy decompressor (unpackbits + boolean-mask assignment). On CUDA also (bytes read +
written) / time against the HBM peak and a device-to-device copy.

GB/s is dense bytes produced per second; `ratio_vs_copy` is decompress time / copy time with the
same kind of output (fresh with fresh, `out=` with the reused buffer)."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..format import compress, spec
from ..format.codecs import codec_names
from ..format.equal import bit_equal
from ..kernels import backends, decompress
from . import harness, peers

NAME = "decompress"
DEFAULT_SHAPE = [8192, 8192]
QUICK_SHAPE = [1024, 1024]
HEADLINE = (torch.float16, 0.5)
TABLE_COLUMNS = ["device", "dtype", "sparsity", "values", "method", "output", "gbps",
                 "ratio_vs_copy", "ratio_vs_raw", "speedup_vs_numpy", "pct_of_hbm", "n"]


def add_arguments(parser) -> None:
    parser.add_argument("--shape", type=harness.int_list, default=None,
                        help=f"tensor shape, comma-separated (default {DEFAULT_SHAPE} = 64M "
                             f"elements, --quick {QUICK_SHAPE})")
    parser.add_argument("--dtypes", type=harness.dtype_list, default="fp16,bf16,fp32")
    parser.add_argument("--sparsities", type=harness.float_list, default="0.5,0.7,0.9")
    parser.add_argument("--backends", default=None,
                        help="comma-separated decompressor backends (default: every available "
                             "one)")
    parser.add_argument("--numpy", choices=("headline", "all", "none"), default="headline",
                        help="where to time the numpy baseline: only float16 at 50%% "
                             "(default), every case, or nowhere")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: the CPU, plus CUDA when there is one")
    parser.add_argument("--hbm-gbps", type=float, default=4800.0,
                        help="device memory peak for pct_of_hbm (default 4800, H200)")
    parser.add_argument("--values", default="raw,exp",
                        help="comma-separated value codecs to decode (default raw,exp: exp's "
                             "rows carry ratio_vs_raw, same backend and output, same run)")
    parser.add_argument("--zipnn", action="store_true",
                        help="also time ZipNN's decompression of the same dense tensor (CPU)")
    parser.add_argument("--seed", type=int, default=0)


def numpy_decompressor(et):
    """The naive CPU decompressor users write first: numpy unpackbits + boolean-mask assignment.
    Returns a no-argument function producing the dense tensor."""
    int_dtype = spec.INT_VIEW[et.dtype]
    bitmap = et.bitmap.cpu().numpy()
    values = et.values.cpu().view(int_dtype).numpy()
    numel, shape = et.numel, et.shape

    def numpy_decompress() -> torch.Tensor:
        mask = np.unpackbits(bitmap, count=numel, bitorder="little").view(bool)
        out = np.zeros(numel, dtype=values.dtype)
        out[mask] = values
        return torch.from_numpy(out).view(et.dtype).view(shape)
    return numpy_decompress


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


def _zipnn_rows(tensor, timed) -> list:
    """ZipNN's decompression of the same dense tensor (its own threads), flagged lossless or
    not: ZipNN 0.5.4 does not round-trip bfloat16 bit-exactly here, but its speed still bounds
    what a Huffman decoder costs."""
    from .peers import PEERS
    zipnn = PEERS["zipnn"]
    blob = zipnn.encode(tensor)
    lossless = bit_equal(zipnn.decode(blob), tensor)
    return [("-", "zipnn", "fresh", timed(lambda: zipnn.decode(blob)),
             zipnn.nbytes(blob) + tensor.numel() * tensor.element_size(), lossless)]


def _case(tensor, ets, device, backend_names, *, with_numpy, with_zipnn, hbm_gbps, warmup,
          repeat) -> list:
    """Every row of one (device, dtype, sparsity): copies, numpy, each codec's backends fresh
    and out=, ZipNN."""
    dense = tensor.to(device)
    dense_bytes = dense.numel() * dense.element_size()
    reused = torch.empty_like(dense)
    timed = lambda fn: harness.measure(fn, warmup=warmup, repeat=repeat, device=device)  # noqa

    rows = [("-", "copy", "fresh", timed(lambda: torch.empty_like(dense).copy_(dense)),
             2 * dense_bytes, True),
            ("-", "copy", "out", timed(lambda: reused.copy_(dense)), 2 * dense_bytes, True)]
    for codec, et in ets.items():
        et = et.to(device)
        read_bytes = et.nbytes
        if with_numpy and device.type == "cpu" and codec == "raw":
            numpy_decompress = numpy_decompressor(et)
            if not bit_equal(numpy_decompress(), tensor):
                raise RuntimeError("the numpy baseline did not decompress bit-exactly")
            rows.append((codec, "numpy", "fresh", timed(numpy_decompress), read_bytes + dense_bytes, True))
        for name in backend_names:
            if not backends()[name].handles(codec):
                continue
            if not bit_equal(decompress(et, backend=name), tensor):
                raise RuntimeError(f"backend {name!r} did not decompress {codec} bit-exactly on "
                                   f"{device}")
            rows.append((codec, name, "fresh", timed(lambda: decompress(et, backend=name)),
                         read_bytes + dense_bytes, True))
            rows.append((codec, name, "out",
                         timed(lambda: decompress(et, backend=name, out=reused)),
                         read_bytes + dense_bytes, True))
    if with_zipnn and device.type == "cpu":
        rows.extend(_zipnn_rows(tensor, timed))

    copy = {output: stats for _, method, output, stats, _, _ in rows if method == "copy"}
    numpy_s = next((s.median_s for _, m, _, s, _, _ in rows if m == "numpy"), None)
    raw_s = {(m, o): s.median_s for c, m, o, s, _, _ in rows if c == "raw"}
    results = []
    for codec, method, output, stats, moved, lossless in rows:
        rw_gbps = stats.gbps(moved)
        raw = raw_s.get((method, output)) if codec not in ("raw", "-") else None
        results.append({
            "device": device.type, "values": codec, "method": method, "output": output,
            "gbps": stats.gbps(dense_bytes), "rw_gbps": rw_gbps,
            "ratio_vs_copy": stats.median_s / copy[output].median_s,
            "ratio_vs_raw": raw / stats.median_s if raw else None,
            "speedup_vs_numpy": numpy_s / stats.median_s if numpy_s else None,
            "pct_of_hbm": 100 * rw_gbps / hbm_gbps if device.type == "cuda" else None,
            "dense_bytes": dense_bytes, "read_bytes": moved - dense_bytes, "lossless": lossless,
            **stats.as_dict(),
        })
    return results


def run(*, shape, backends, device, dtypes, sparsities, seed, numpy, hbm_gbps, quick, warmup,
        repeat, values, zipnn) -> dict:
    load_before = harness.system_load()
    shape = shape or (QUICK_SHAPE if quick else DEFAULT_SHAPE)
    if math.prod(shape) == 0:
        raise ValueError(f"--shape {shape} has no elements")
    wanted = [x.strip() for x in backends.split(",")] if backends else None
    codecs = [x.strip() for x in values.split(",") if x.strip()]
    unknown = sorted(set(codecs) - set(codec_names()))
    if unknown or not codecs:
        raise ValueError(f"--values {values!r}: choose from {codec_names()}")
    if zipnn and not peers.PEERS["zipnn"].available():
        raise ValueError("--zipnn: the zipnn package is not installed (pip install zipnn)")
    devices = _devices(device)
    per_device = {d.type: _backends(d, wanted) for d in devices}
    results = []
    for dtype in dtypes:
        for sparsity in sparsities:
            tensor = harness.random_sparse(shape, dtype, sparsity, seed=seed)
            ets = {codec: compress(tensor, values=codec) for codec in codecs}
            with_numpy = numpy == "all" or (numpy == "headline"
                                                 and (dtype, sparsity) == HEADLINE)
            for device in devices:
                for row in _case(tensor, ets, device, per_device[device.type],
                                 with_numpy=with_numpy, with_zipnn=zipnn,
                                 hbm_gbps=hbm_gbps, warmup=warmup,
                                 repeat=repeat):
                    results.append({"dtype": harness.dtype_name(dtype), "sparsity": sparsity,
                                    "numel": tensor.numel(), **row})
            del tensor, ets
    params = {"load_avg": {"before": load_before, "after": harness.system_load()},
              "shape": list(shape), "dtypes": [harness.dtype_name(d) for d in dtypes],
              "sparsities": list(sparsities), "backends": per_device,
              "numpy": numpy, "hbm_gbps": hbm_gbps, "seed": seed,
              "values": codecs, "zipnn_version": peers.zipnn_version() if zipnn else None,
              "quick": quick, "warmup": warmup, "repeat": repeat}
    return harness.envelope(NAME, params, results, table_columns=TABLE_COLUMNS)
