"""`endor bench formats`: bits per element and decompression GB/s of Endor (raw and exp values)
against the formats people use (CSR, COO, compressed-tensors sparse-bitmask, zstd, lz4, ZipNN),
with the (1-s)*b+1 bound and a dense copy measured in the same run as the baseline.

Sources: random tensors pruned to exact sparsities (`random`: randn with random zeros;
`normal-magnitude`: normal(0, 0.02) pruned by magnitude), or the embedded models' decoder weights
pruned by `endor convert` (`models`, formats_models.py).

Decompression GB/s is dense bytes produced per second (median after warm-up); every format's round
trip is checked bit-exact before it is timed, otherwise the comparison would mean nothing."""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..format import compress
from ..format.equal import bit_equal
from ..kernels import choose, decompress
from . import formats_models, harness, peers

NAME = "formats"
DEFAULT_SHAPE = [4096, 4096]
QUICK_SHAPE = [128, 512]
MODEL_TABLE_COLUMNS = ["model", "method", "pattern", "dtype", "format", "bits_per_element",
                       "compression_ratio", "decode_gbps", "decode_vs_copy", "lossless",
                       "matrices", "sparsity"]
# On model weights: the formats whose sizes are not plain arithmetic of nnz (CSR and COO are, and
# the reference decoder stores what "endor" stores); --formats adds them back.
MODEL_FORMATS = ("dense", "endor", "endor-exp", "ct-bitmask", "zstd", "lz4", "zipnn")
TABLE_COLUMNS = ["dtype", "sparsity", "format", "bits_per_element", "bits_bound",
                 "compression_ratio", "decode_gbps", "decode_vs_copy", "lossless", "n"]


def add_arguments(parser) -> None:
    parser.add_argument("--shape", type=harness.int_list, default=None,
                        help=f"tensor shape, comma-separated (default {DEFAULT_SHAPE}, "
                             f"--quick {QUICK_SHAPE})")
    parser.add_argument("--dtypes", type=harness.dtype_list, default=None,
                        help="comma-separated dtypes (default fp32,fp16,bf16; --source models: "
                             "bf16,fp16, fp16 cast from the models' bf16)")
    parser.add_argument("--sparsities", type=harness.float_list, default="0.5,0.6,0.7",
                        help="comma-separated sparsities (default 0.5,0.6,0.7)")
    parser.add_argument("--formats", default=None,
                        help="comma-separated subset of: " + ", ".join(format_names())
                             + " (--source models default: " + ",".join(MODEL_FORMATS) + ")")
    parser.add_argument("--source", choices=("random", "normal-magnitude", "models"),
                        default="random",
                        help="random: randn with random zeros; normal-magnitude: normal(0, 0.02) "
                             "pruned by magnitude, like a pruned LLM weight; models: the "
                             "embedded models' decoder weight matrices pruned by endor convert "
                             "(default: random)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for the run, which every format's decoder uses "
                             "(endor's, torch's copy, compressed-tensors', ZipNN's; zstd and "
                             "lz4 use one); default: torch's. On a busy machine a 2-thread "
                             "torch copy waits for the second thread: --threads 1 compares "
                             "per-thread speed")
    group = parser.add_argument_group("--source models")
    group.add_argument("--models", type=_names(None), default=formats_models.MODELS,
                       help="comma-separated aliases or model directories (default "
                            f"{','.join(formats_models.MODELS)})")
    group.add_argument("--methods", type=_names(formats_models.METHODS),
                       default=formats_models.METHODS,
                       help=f"comma-separated (default {','.join(formats_models.METHODS)})")
    group.add_argument("--patterns", type=_names(tuple(formats_models.PATTERNS)),
                       default=tuple(formats_models.PATTERNS),
                       help="comma-separated: 50%%, 2:4 (default both)")
    group.add_argument("--calib-samples", type=int, default=formats_models.CALIB_SAMPLES,
                       help="Wanda's calibration segments of 256 tokens (default "
                            f"{formats_models.CALIB_SAMPLES})")
    group.add_argument("--timed-layer", type=int, default=None,
                       help="the decoder layer whose matrices are timed (default: the middle "
                            "one); sizes and exactness cover every layer")
    group.add_argument("--workdir", default=None,
                       help="keep the pruned checkpoints here and reuse them on the next run "
                            "(default: a temporary directory, removed)")


def _names(choices):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(",") if n.strip())
        bad = [n for n in names if choices is not None and n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices or ['a name'])}; "
                                             f"got {text!r}")
        return names
    return parse


@dataclass(frozen=True)
class Codec:
    """One row of the comparison: how a dense tensor is stored and rebuilt."""
    name: str
    description: str
    encode: Callable[[torch.Tensor], object]
    decode: Callable[[object], torch.Tensor]
    nbytes: Callable[[object], int]
    must_be_exact: bool = True
    # Counts worth summing over tensors (the exp codec's escapes), from the encoded object.
    counts: Callable[[object], dict] | None = None


def codecs() -> list[Codec]:
    auto = choose("auto", torch.device("cpu")).name
    auto_exp = choose("auto", torch.device("cpu"), "exp").name
    found = [
        Codec("dense", "dense copy (torch clone): the memcpy baseline", lambda t: t,
              lambda t: t.clone(), lambda t: t.numel() * t.element_size()),
        Codec("endor", f"endor, raw values (v1's), backend auto ({auto})",
              lambda t: compress(t, values="raw"), decompress, lambda et: et.nbytes),
        Codec("endor-exp", f"endor, exp-coded values, backend auto ({auto_exp})",
              lambda t: compress(t, values="exp"), decompress, lambda et: et.nbytes,
              counts=lambda et: {"escapes": et.codec_params["escapes"], "nnz": et.nnz}),
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


def measure_codec(codec: Codec, tensor: torch.Tensor, *, warmup: int, repeat: int,
                  timed: bool = True) -> dict:
    """Size, exactness and (when `timed`) decode time of one format on one tensor."""
    t0 = time.perf_counter()
    encoded = codec.encode(tensor)
    encode_s = time.perf_counter() - t0
    lossless = bit_equal(codec.decode(encoded), tensor)
    if not lossless and codec.must_be_exact:
        raise RuntimeError(f"format {codec.name!r} did not round-trip bit-exactly; its numbers "
                           "would be meaningless")
    dense_bytes = tensor.numel() * tensor.element_size()
    timing = {"decode_gbps": None, "median_s": None, "min_s": None, "max_s": None, "n": 0}
    if timed:
        stats = harness.measure(lambda: codec.decode(encoded), warmup=warmup, repeat=repeat)
        timing = {"decode_gbps": stats.gbps(dense_bytes), **stats.as_dict()}
    return {
        "format": codec.name,
        "bits_per_element": 8 * codec.nbytes(encoded) / tensor.numel(),
        "stored_bytes": codec.nbytes(encoded),
        "dense_bytes": dense_bytes,
        **timing,
        "encode_s": encode_s,
        "lossless": lossless,
        **(codec.counts(encoded) if codec.counts else {}),
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


def choose_codecs(formats: str | None, default=None) -> list[Codec]:
    """The formats asked for (`default` when none is), the dense copy always first: every GB/s
    is reported against it."""
    chosen = codecs()
    wanted = [x.strip() for x in formats.split(",") if x.strip()] if formats else default
    if wanted is None:
        return chosen
    unknown = sorted(set(wanted) - set(format_names()))
    if unknown:
        raise ValueError(f"unknown format(s) {unknown}; choose from {format_names()}")
    return [c for c in chosen if c.name in wanted or c.name == "dense"]


def run(*, shape, formats, dtypes, sparsities, seed, quick, warmup, repeat,
        source="random", models=formats_models.MODELS, methods=formats_models.METHODS,
        patterns=tuple(formats_models.PATTERNS), calib_samples=formats_models.CALIB_SAMPLES,
        timed_layer=None, workdir=None, threads=None) -> dict:
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        doc = _run(shape=shape, formats=formats, dtypes=dtypes, sparsities=sparsities, seed=seed,
                   quick=quick, warmup=warmup, repeat=repeat, source=source, models=models,
                   methods=methods, patterns=patterns, calib_samples=calib_samples,
                   timed_layer=timed_layer, workdir=workdir)
    finally:
        torch.set_num_threads(before)
    return doc


def _run(*, shape, formats, dtypes, sparsities, seed, quick, warmup, repeat, source, models,
         methods, patterns, calib_samples, timed_layer, workdir) -> dict:
    load_before = harness.system_load()
    if source == "models":
        chosen = choose_codecs(formats, MODEL_FORMATS)
        dtypes = dtypes or [torch.bfloat16, torch.float16]
        results, used = formats_models.model_rows(
            models=models, methods=methods, patterns=patterns, dtypes=dtypes, codecs=chosen,
            measure=lambda c, t, timed: measure_codec(c, t, warmup=warmup, repeat=repeat,
                                                      timed=timed),
            calib_samples=calib_samples, workdir=workdir, timed_layer=timed_layer)
        params = {"models": list(models), "methods": list(methods), "patterns": list(patterns),
                  "calib_samples": calib_samples, "models_used": used}
        columns = MODEL_TABLE_COLUMNS
    else:
        shape = shape or (QUICK_SHAPE if quick else DEFAULT_SHAPE)
        chosen = choose_codecs(formats)
        dtypes = dtypes or [torch.float32, torch.float16, torch.bfloat16]
        results = random_rows(source, shape, dtypes, sparsities, seed, chosen,
                              warmup=warmup, repeat=repeat)
        params = {"shape": list(shape), "sparsities": list(sparsities), "seed": seed}
        columns = TABLE_COLUMNS
    params.update({"load_avg": {"before": load_before, "after": harness.system_load()},
                   "dtypes": [harness.dtype_name(d) for d in dtypes], "quick": quick,
                   "warmup": warmup, "repeat": repeat, "source": source,
                   "threads": torch.get_num_threads(),
                   "formats": {c.name: c.description for c in chosen}})
    if "zipnn" in params["formats"]:
        params["zipnn_version"] = peers.zipnn_version()
    if "ct-bitmask" in params["formats"]:
        params["ct_bitmask_code"] = peers.ct_origin()
    return harness.envelope(NAME, params, results, table_columns=columns)


def random_rows(source, shape, dtypes, sparsities, seed, chosen, *, warmup, repeat) -> list:
    numel = math.prod(shape)
    if numel == 0:
        raise ValueError(f"--shape {shape} has no elements")
    results = []
    for dtype in dtypes:
        for sparsity in sparsities:
            tensor = make_tensor(source, shape, dtype, sparsity, seed)
            rows = [measure_codec(c, tensor, warmup=warmup, repeat=repeat) for c in chosen]
            copy_gbps = rows[0]["decode_gbps"]
            bits = dtype.itemsize * 8
            for row in rows:
                row.update(dtype=harness.dtype_name(dtype), sparsity=sparsity, numel=numel,
                           bits_bound=bits_bound(dtype, sparsity),
                           compression_ratio=bits / row["bits_per_element"],
                           decode_vs_copy=row["decode_gbps"] / copy_gbps)
            results.extend(rows)
            del tensor
    return results
