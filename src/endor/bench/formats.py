"""`endor bench formats`: bits per element and decompression GB/s of Endor against the formats
people use (CSR, COO, compressed-tensors sparse-bitmask, zstd, lz4), on random tensors pruned to
exact sparsities, with the (1-s)*b+1 bound and a dense copy measured in the same run as the
baseline.

Decompression GB/s is dense bytes produced per second (median after warm-up); every format's round
trip is checked bit-exact before it is timed, otherwise the comparison would mean nothing."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..format import compress
from ..format.equal import bit_equal
from ..kernels import choose, decompress
from . import harness, peers

NAME = "formats"
DEFAULT_SHAPE = [4096, 4096]
QUICK_SHAPE = [128, 512]
TABLE_COLUMNS = ["dtype", "sparsity", "format", "bits_per_element", "bits_bound",
                 "compression_ratio", "decode_gbps", "decode_vs_copy", "lossless", "n"]


def add_arguments(parser) -> None:
    parser.add_argument("--shape", type=harness.int_list, default=None,
                        help=f"tensor shape, comma-separated (default {DEFAULT_SHAPE}, "
                             f"--quick {QUICK_SHAPE})")
    parser.add_argument("--dtypes", type=harness.dtype_list, default="fp32,fp16,bf16",
                        help="comma-separated dtypes (default fp32,fp16,bf16)")
    parser.add_argument("--sparsities", type=harness.float_list, default="0.5,0.6,0.7",
                        help="comma-separated sparsities (default 0.5,0.6,0.7)")
    parser.add_argument("--formats", default=None,
                        help="comma-separated subset of: " + ", ".join(format_names()))
    parser.add_argument("--source", choices=("random", "normal-magnitude"), default="random",
                        help="random: randn with random zeros; normal-magnitude: normal(0, 0.02) "
                             "pruned by magnitude, like a pruned LLM weight (default: random)")
    parser.add_argument("--seed", type=int, default=0)


@dataclass(frozen=True)
class Codec:
    """One row of the comparison: how a dense tensor is stored and rebuilt."""
    name: str
    description: str
    encode: Callable[[torch.Tensor], object]
    decode: Callable[[object], torch.Tensor]
    nbytes: Callable[[object], int]
    must_be_exact: bool = True


def codecs() -> list[Codec]:
    auto = choose("auto", torch.device("cpu")).name
    auto_exp = choose("auto", torch.device("cpu"), "exp").name
    found = [
        Codec("dense", "dense copy (torch clone): the memcpy baseline", lambda t: t,
              lambda t: t.clone(), lambda t: t.numel() * t.element_size()),
        Codec("endor", f"endor, raw values (v1's), backend auto ({auto})",
              lambda t: compress(t, values="raw"), decompress, lambda et: et.nbytes),
        Codec("endor-exp", f"endor, exp-coded values, backend auto ({auto_exp})",
              lambda t: compress(t, values="exp"), decompress, lambda et: et.nbytes),
        Codec("endor-reference", "endor raw values, backend reference",
              lambda t: compress(t, values="raw"),
              lambda et: decompress(et, backend="reference"), lambda et: et.nbytes),
    ]
    for p in peers.available_peers().values():
        found.append(Codec(p.name, p.description, p.encode, p.decode, p.nbytes,
                           p.must_be_exact))
    return found


def format_names() -> list[str]:
    return ["dense", "endor", "endor-exp", "endor-reference", *peers.PEERS]


def bits_bound(dtype: torch.dtype, sparsity: float) -> float:
    """(1-s)*b+1: values plus a one-bit bitmap, nothing else."""
    return (1.0 - sparsity) * dtype.itemsize * 8 + 1.0


def measure_codec(codec: Codec, tensor: torch.Tensor, *, warmup: int, repeat: int) -> dict:
    t0 = time.perf_counter()
    encoded = codec.encode(tensor)
    encode_s = time.perf_counter() - t0
    lossless = bit_equal(codec.decode(encoded), tensor)
    if not lossless and codec.must_be_exact:
        raise RuntimeError(f"format {codec.name!r} did not round-trip bit-exactly; its numbers "
                           "would be meaningless")
    stats = harness.measure(lambda: codec.decode(encoded), warmup=warmup, repeat=repeat)
    dense_bytes = tensor.numel() * tensor.element_size()
    return {
        "format": codec.name,
        "bits_per_element": 8 * codec.nbytes(encoded) / tensor.numel(),
        "stored_bytes": codec.nbytes(encoded),
        "decode_gbps": stats.gbps(dense_bytes),
        **stats.as_dict(),
        "encode_s": encode_s,
        "lossless": lossless,
    }


def make_tensor(source: str, shape, dtype, sparsity: float, seed: int) -> torch.Tensor:
    if source == "random":
        return harness.random_sparse(shape, dtype, sparsity, seed=seed)
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    zeros = round(sparsity * w.numel())
    if zeros:
        w.view(-1)[w.abs().view(-1).argsort()[:zeros]] = 0
    return w.to(dtype)


def run(*, shape, formats, dtypes, sparsities, seed, quick, warmup, repeat,
        source="random") -> dict:
    load_before = harness.system_load()
    shape = shape or (QUICK_SHAPE if quick else DEFAULT_SHAPE)
    numel = math.prod(shape)
    if numel == 0:
        raise ValueError(f"--shape {shape} has no elements")
    chosen = codecs()
    if formats:
        wanted = [x.strip() for x in formats.split(",") if x.strip()]
        unknown = sorted(set(wanted) - set(format_names()))
        if unknown:
            raise ValueError(f"unknown format(s) {unknown}; choose from {format_names()}")
        # The dense copy stays: every GB/s is reported against it.
        chosen = [c for c in chosen if c.name in wanted or c.name == "dense"]
    results = []
    for dtype in dtypes:
        for sparsity in sparsities:
            tensor = make_tensor(source, shape, dtype, sparsity,
                                 seed)
            rows = [measure_codec(c, tensor, warmup=warmup, repeat=repeat)
                    for c in chosen]
            copy_gbps = rows[0]["decode_gbps"]
            bits = dtype.itemsize * 8
            for row in rows:
                row.update(dtype=harness.dtype_name(dtype), sparsity=sparsity, numel=numel,
                           bits_bound=bits_bound(dtype, sparsity),
                           compression_ratio=bits / row["bits_per_element"],
                           decode_vs_copy=row["decode_gbps"] / copy_gbps)
            results.extend(rows)
            del tensor
    params = {"load_avg": {"before": load_before, "after": harness.system_load()},
              "shape": list(shape), "dtypes": [harness.dtype_name(d) for d in dtypes],
              "sparsities": list(sparsities), "seed": seed, "quick": quick,
              "warmup": warmup, "repeat": repeat,
              "formats": {c.name: c.description for c in chosen}}
    params["source"] = source
    if "zipnn" in params["formats"]:
        params["zipnn_version"] = peers.zipnn_version()
    if "ct-bitmask" in params["formats"]:
        params["ct_bitmask_code"] = peers.ct_origin()
    return harness.envelope(NAME, params, results, table_columns=TABLE_COLUMNS)
