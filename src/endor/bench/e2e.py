"""`endor bench e2e`: decode tokens/s of a model larger than its memory budget, weights on disk.

A Llama-shaped random-weight model (default about 1.15 GB of bf16 weights: bf16 because this
kind of CPU runs bf16 GEMV several times faster than fp16) is pruned to 50% by magnitude and
converted twice, to Endor and to dense weights. The budget (default 10% of the model) keeps only
the non-layer weights resident, so every decoder layer is read from disk for every token. Timed,
in the same run, each after evicting the checkpoint from the page cache:

  endor            our pipeline, Endor weights (O_DIRECT reads, prefetch, decode into buffers)
  dense            our pipeline, dense weights: only the format differs
  accelerate-cold  HF Accelerate disk offload of the dense checkpoint, every layer's shard
                   evicted right before Accelerate reads it (a model larger than RAM)
  accelerate-warm  the same, evicted only before each run: later tokens hit the page cache
  ideal            dense time x Endor bytes / dense bytes: the format's gain, nothing lost
  disk             O_DIRECT read of the dense shards alone: the link's limit

Runs are interleaved (one of each system per round). Each row reports the median seconds per
decode token over --repeat runs (after --warmup), the bytes read per token and the GB/s that
makes, and (ours) the busy time of each pipeline stage.
All systems must generate the same greedy tokens. Done when endor/dense >= 1.5, endor/
accelerate-cold >= 2.0 and endor time <= 1.15 x ideal."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from . import harness

NAME = "e2e"
DONE_WHEN = {"endor_vs_dense_min": 1.5, "endor_vs_accelerate_min": 2.0,
             "endor_vs_ideal_time_max": 1.15}
TABLE_COLUMNS = ["system", "decode_tokens_per_s", "s_per_token", "min_s", "max_s", "n",
                 "mb_read_per_token", "gbps", "read_ms", "decompress_ms", "compute_ms",
                 "stall_ms", "tokens_match"]
DEFAULT_SHAPE = dict(hidden=2048, intermediate=5632, layers=12, heads=16, kv_heads=4,
                     vocab=16384)
QUICK_SHAPE = dict(hidden=256, intermediate=512, layers=4, heads=4, kv_heads=2, vocab=1024)


def add_arguments(parser) -> None:
    for key, value in DEFAULT_SHAPE.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                            help=f"model shape (default {value}; --quick {QUICK_SHAPE[key]})")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        default="bfloat16", help="weight and compute dtype (default bfloat16)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--budget-fraction", type=float, default=0.1,
                        help="max_memory as a fraction of the model's bytes (default 0.1)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="tokens generated per run (default 8, --quick 4)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--prefetch", type=int, default=3,
                        help="layers loading ahead, for both pipelines (default 3: up to three "
                             "shard reads in flight, which this virtual disk rewards)")
    parser.add_argument("--systems", default="endor,dense,accelerate-cold,accelerate-warm",
                        help="comma-separated subset to time")
    parser.add_argument("--workdir", default=None,
                        help="where the synthetic and converted checkpoints are cached (default "
                             "$ENDOR_CACHE/bench-e2e or ~/.cache/endor/bench-e2e; --quick: a "
                             "temporary directory, removed)")


def _config(args):
    from transformers import LlamaConfig

    shape = {k: getattr(args, k) or (QUICK_SHAPE if args.quick else DEFAULT_SHAPE)[k]
             for k in DEFAULT_SHAPE}
    return LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                       num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
                       tie_word_embeddings=True, max_position_embeddings=4096,
                       architectures=["LlamaForCausalLM"]), shape


def _prepare(config, args, workdir: Path) -> dict:
    """Synthetic HF checkpoint -> converted "endor" and "dense" checkpoints (cached by shape)."""
    from ..convert import convert
    from ..convert.synthetic import write_synthetic_checkpoint

    key = hashlib.sha256(json.dumps([config.to_dict(), args.dtype, args.sparsity],
                                    sort_keys=True, default=str).encode()).hexdigest()[:12]
    root = workdir / f"llama-{key}"
    hf = root / "hf"
    if not (hf / "config.json").is_file():
        write_synthetic_checkpoint(hf, config, dtype=getattr(torch, args.dtype))
    out = {}
    for weights in ("endor", "dense"):
        out[weights] = root / weights
        if not (out[weights] / "endor.json").is_file():
            convert(hf, out[weights], method="magnitude", sparsity=args.sparsity,
                    weights=weights, progress=False)
    return out


def _shards(path) -> list[Path]:
    from ..checkpoint import Checkpoint
    ckpt = Checkpoint(path)
    return [ckpt.path / s.file for s in ckpt.shards]


def _evict(files) -> bool:
    return all([harness.evict_page_cache(f) for f in files])


def _generate(model, prompt, new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
    return out[0, prompt.shape[1]:].tolist()


def _time(models: dict, prompt, args) -> dict:
    """Runs interleaved (every system once per round, so slow drifts in the shared disk and CPUs
    hit all alike), each after evicting its files. Per system: (Stats of decode seconds per
    token, the median run's stats, its tokens, whether eviction worked)."""
    runs = {name: [] for name in models}
    cold = dict.fromkeys(models, True)
    for i in range(args.warmup + args.repeat):
        for name, (model, files) in models.items():
            cold[name] &= _evict(files)
            model.endor_reset_stats()
            tokens = _generate(model, prompt, args.new_tokens)
            if i >= args.warmup:
                stats = model.endor_stats()
                runs[name].append((stats["decode_s"] / stats["decode_tokens"], stats, tokens))
    out = {"_rounds": {name: [r[0] for r in rs] for name, rs in runs.items()}}
    for name, rs in runs.items():
        rs = sorted(rs, key=lambda r: r[0])
        per_token = [r[0] for r in rs]
        median = rs[len(rs) // 2]
        out[name] = (harness.Stats(statistics.median(per_token), per_token[0], per_token[-1],
                                   len(rs)), median[1], median[2], cold[name])
    return out


def _row(system: str, t: harness.Stats, stats: dict, tokens, reference, cold: bool) -> dict:
    row = {"system": system, "decode_tokens_per_s": 1.0 / t.median_s, "s_per_token": t.median_s,
           "min_s": t.min_s, "max_s": t.max_s, "n": t.n}
    nbytes = stats.get("bytes_read_per_token") or stats.get("streamed_shard_bytes", 0)
    row["mb_read_per_token"] = nbytes / 1e6
    row["gbps"] = t.gbps(int(nbytes))
    split = stats.get("split_s_per_token")
    if split and stats.get("runtime") != "accelerate":  # Accelerate has no stages to split
        row.update({f"{k}_ms": v * 1e3 for k, v in split.items()})
    row.update(prefill_s=stats["prefill_s"], page_cache_evicted=cold,
               streamed_layers=len(stats["streamed_layers"]),
               resident_layers=len(stats["resident_layers"]),
               direct_io=stats.get("direct_io"), compute_threads=stats.get("compute_threads"),
               buffer_bytes=stats.get("buffer_host_bytes", 0) + stats.get("buffer_device_bytes",
                                                                           0),
               tokens_match=reference is None or tokens == reference)
    return row


def _disk_row(files, args) -> dict:
    from ..runtime.reader import ShardReader, aligned_buffer

    reader = ShardReader()
    buf = aligned_buffer(max(f.stat().st_size for f in files))
    total = sum(f.stat().st_size for f in files)

    def read_all():
        for f in files:
            reader.read_into(f, buf, f.stat().st_size)

    try:
        t = harness.measure(read_all, warmup=args.warmup, repeat=args.repeat,
                            setup=lambda: _evict(files))
    finally:
        reader.close()
    return {"system": "disk", "s_per_token": t.median_s, "min_s": t.min_s, "max_s": t.max_s,
            "n": t.n, "mb_read_per_token": total / 1e6, "gbps": t.gbps(total),
            "direct_io": reader.direct}


def run(args) -> dict:
    from ..runtime import load_model
    from ..runtime.baseline import evict_on_read, load_accelerate
    from ..runtime.model import thread_split

    if args.new_tokens is None:
        args.new_tokens = 4 if args.quick else 8
    if args.new_tokens < 2 or not 0 < args.budget_fraction <= 1 or args.prefetch < 0:
        raise ValueError("--new-tokens must be >= 2, --budget-fraction in (0, 1], "
                         "--prefetch >= 0")
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - {"endor", "dense", "accelerate-cold", "accelerate-warm"}
    if unknown:
        raise ValueError(f"unknown systems {sorted(unknown)}")
    config, shape = _config(args)
    temp = None
    if args.workdir:
        workdir = Path(args.workdir)
    elif args.quick:
        workdir = temp = Path(tempfile.mkdtemp(prefix="endor-e2e-"))
    else:
        workdir = Path(os.environ.get("ENDOR_CACHE", Path.home() / ".cache" / "endor")) / \
            "bench-e2e"
    try:
        t0 = time.perf_counter()
        paths = _prepare(config, args, workdir)
        prepare_s = time.perf_counter() - t0
        dense_files, endor_files = _shards(paths["dense"]), _shards(paths["endor"])
        model_bytes = sum(f.stat().st_size for f in dense_files)
        budget = int(args.budget_fraction * model_bytes)
        prompt = torch.randint(config.vocab_size, (1, args.prompt_len),
                               generator=torch.Generator().manual_seed(0))
        # The compute threads our pipeline uses are given to Accelerate too, so only the
        # loading strategy differs (and one thread computes faster than two on a busy 2-core
        # machine).
        threads = thread_split(torch.device("cpu"), True)[0]
        models = {}
        try:
            for system in systems:
                if system in ("endor", "dense"):
                    model = load_model(paths[system], max_memory=budget, offload="disk",
                                       prefetch=args.prefetch)
                    files = endor_files if system == "endor" else dense_files
                else:
                    model = load_accelerate(paths["dense"], max_memory=budget, offload="disk",
                                            compute_threads=threads)
                    files = dense_files
                    if system == "accelerate-cold":
                        evict_on_read(model)
                models[system] = (model, files)
            timed = _time(models, prompt, args)
        finally:
            for model, _ in models.values():
                model.endor_close()
            models.clear()
            gc.collect()
        rows, reference = [], None
        for system in systems:
            t, stats, tokens, cold = timed[system]
            reference = reference if reference is not None else tokens
            rows.append(_row(system, t, stats, tokens, reference, cold))
        by = {r["system"]: r for r in rows}
        ratios = {}
        if "dense" in by and "endor" in by:
            ideal_s = by["dense"]["s_per_token"] * by["endor"]["mb_read_per_token"] / \
                by["dense"]["mb_read_per_token"]
            rows.append({"system": "ideal", "decode_tokens_per_s": 1.0 / ideal_s,
                         "s_per_token": ideal_s,
                         "mb_read_per_token": by["endor"]["mb_read_per_token"]})
            ratios["endor_vs_dense"] = by["dense"]["s_per_token"] / by["endor"]["s_per_token"]
            ratios["endor_vs_ideal_time"] = by["endor"]["s_per_token"] / ideal_s
            ratios["bytes_dense_vs_endor"] = by["dense"]["mb_read_per_token"] / \
                by["endor"]["mb_read_per_token"]
        for acc in ("accelerate-cold", "accelerate-warm"):
            if acc in by and "endor" in by:
                ratios[f"endor_vs_{acc.replace('-', '_')}"] = \
                    by[acc]["s_per_token"] / by["endor"]["s_per_token"]
        # The same ratios within each round (runs of one round are back to back), median over
        # rounds: robust to the shared disk getting slower or faster between rounds.
        rounds = timed["_rounds"]
        for other in ("dense", "accelerate-cold", "accelerate-warm"):
            if other in rounds and "endor" in rounds:
                ratios[f"endor_vs_{other.replace('-', '_')}_paired"] = statistics.median(
                    o / e for o, e in zip(rounds[other], rounds["endor"]))
        rows.append(_disk_row(dense_files, args))
        met = {}
        if "endor_vs_dense" in ratios:
            met["endor_vs_dense"] = ratios["endor_vs_dense"] >= DONE_WHEN["endor_vs_dense_min"]
            met["endor_vs_ideal"] = ratios["endor_vs_ideal_time"] <= \
                DONE_WHEN["endor_vs_ideal_time_max"]
        if "endor_vs_accelerate_cold" in ratios:
            met["endor_vs_accelerate"] = ratios["endor_vs_accelerate_cold"] >= \
                DONE_WHEN["endor_vs_accelerate_min"]
        params = {"shape": shape, "dtype": args.dtype, "sparsity": args.sparsity,
                  "model_bytes": model_bytes, "budget_bytes": budget,
                  "budget_fraction": args.budget_fraction, "new_tokens": args.new_tokens,
                  "prompt_len": args.prompt_len, "prefetch": args.prefetch,
                  "repeat": args.repeat, "warmup": args.warmup, "quick": args.quick,
                  "torch_threads": torch.get_num_threads(), "prepare_s": prepare_s}
        return harness.envelope(NAME, params, rows, ratios=ratios, done_when=DONE_WHEN,
                                met=met, rounds_s_per_token=rounds,
                                table_columns=TABLE_COLUMNS)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
