"""`endor bench e2e`: decode tokens/s of a model larger than its memory budget, weights on disk.

A Llama-shaped random-weight model (default about 1.15 GB of bf16 weights: bf16 because this
kind of CPU runs bf16 GEMV several times faster than fp16) is pruned to 50% by magnitude and
converted twice, to Endor and to dense weights. The budget (default 10% of the model; 0, the
least possible, when the non-layer weights exceed it) keeps only the non-layer weights
resident, so every decoder layer is read from disk for every token. Timed, in the same run,
each after evicting the checkpoint from the page cache:

  endor            our pipeline, Endor weights (O_DIRECT reads, prefetch, decompress into buffers)
  dense            our pipeline, dense weights: only the format differs
  accelerate-cold  HF Accelerate disk offload of the dense checkpoint, every layer's shard
                   evicted right before Accelerate reads it (a model larger than RAM)
  accelerate-warm  the same, evicted only before each run: later tokens hit the page cache
  ideal            dense time x Endor bytes / dense bytes: the format's gain, nothing lost
  disk             O_DIRECT read of the dense shards alone: the link's limit
  h2d              (--device cuda) pinned host-to-device copy of the dense shards: the link's
                   limit when the weights are held in host RAM

--device cuda computes on the GPU (random weights, pruning and conversion still on the CPU);
--offload cpu holds the streamed layers in host RAM instead of reading them from disk (our
pipeline: the shards' bytes, pinned; Accelerate: its "cpu" device_map entries), and then the
Accelerate baseline is one system, "accelerate" (nothing to evict).

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
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..convert import convert
from ..convert.synthetic import write_synthetic_checkpoint
from ..runtime import load_model
from ..runtime.model import thread_split
from ..runtime.reader import ShardReader, aligned_buffer
from ..runtime.weights import layer_files
from . import harness
from .baseline import evict_on_read, load_accelerate
from .e2e_checks import (COST_MAX, base_system, checks_met, checks_ratios, parse_checks,
                         with_checks)

NAME = "e2e"
DONE_WHEN = {"endor_vs_dense_min": 1.5, "endor_vs_accelerate_min": 2.0,
             "endor_vs_ideal_time_max": 1.15}
DISK_SYSTEMS = ("endor", "dense", "accelerate-cold", "accelerate-warm")
CPU_SYSTEMS = ("endor", "dense", "accelerate")
TABLE_COLUMNS = ["system", "decode_tokens_per_s", "s_per_token", "min_s", "max_s", "n",
                 "mb_read_per_token", "gbps", "read_ms", "verify_ms", "transfer_ms",
                 "decompress_ms", "compute_ms", "stall_ms", "tokens_match"]
DEFAULT_SHAPE = dict(hidden=2048, intermediate=5632, layers=12, heads=16, kv_heads=4,
                     vocab=16384)
QUICK_SHAPE = dict(hidden=256, intermediate=512, layers=4, heads=4, kv_heads=2, vocab=1024)


@dataclass(frozen=True)
class Options:
    """One run's options, named as add_arguments names them; None shape entries and new_tokens
    take the default (or --quick) values."""
    hidden: int | None
    intermediate: int | None
    layers: int | None
    heads: int | None
    kv_heads: int | None
    vocab: int | None
    dtype: str
    sparsity: float
    io: str
    budget_fraction: float
    new_tokens: int | None
    prompt_len: int
    prefetch: int
    endor_prefetch: int | None
    device: str
    offload: str
    systems: str | None
    max_seconds: float | None
    workdir: str | None
    quick: bool
    warmup: int
    repeat: int
    # --moe (bench/e2e_moe.py): a mixture-of-experts model with routed expert reads
    moe: bool = False
    expert_intermediate: int | None = None
    experts: int | None = None
    top_k: int | None = None
    zipf: float = 1.0
    routers: str = "uniform,zipf"
    moe_systems: str | None = None
    checks: str = "on"  # bench/e2e_checks.py


def add_arguments(parser) -> None:
    for key, value in DEFAULT_SHAPE.items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                            help=f"model shape (default {value}; --quick {QUICK_SHAPE[key]})")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        default="bfloat16", help="weight and compute dtype (default bfloat16)")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--io", choices=("direct", "buffered"), default="direct",
                        help="how our pipeline reads shards: O_DIRECT (default) or buffered reads "
                             "evicted from the page cache right after (cold either way)")
    parser.add_argument("--budget-fraction", type=float, default=0.1,
                        help="max_memory as a fraction of the model's bytes (default 0.1)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="tokens generated per run (default 8, --quick 4)")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--prefetch", type=int, default=3,
                        help="layers loading ahead, for both pipelines (default 3: up to three "
                             "shard reads in flight, which this virtual disk rewards)")
    parser.add_argument("--endor-prefetch", type=int, default=None,
                        help="prefetch of the Endor pipeline alone (default: --prefetch)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the model computes (default cpu)")
    parser.add_argument("--offload", choices=("disk", "cpu"), default="disk",
                        help="where streamed layers live between uses: disk (read cold every "
                             "token) or cpu (host RAM; needs --device cuda). Default disk")
    parser.add_argument("--systems", default=None,
                        help="comma-separated subset to time (default, --offload disk: "
                             f"{','.join(DISK_SYSTEMS)}; --offload cpu: {','.join(CPU_SYSTEMS)})")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop timing rounds once the next would end past this many seconds "
                             "(at least one timed round; the rows' n says how many ran)")
    parser.add_argument("--checks", default="on",
                        help="on (default), off or on,off: time our pipelines with checksums "
                             "verified, not verified (load_model(verify=False)), or both in the "
                             "same interleaved rounds, reporting what checking costs")
    from .e2e_moe import add_moe_arguments  # local: e2e_moe builds on this module's helpers
    add_moe_arguments(parser)
    parser.add_argument("--workdir", default=None,
                        help="where the synthetic and converted checkpoints are cached (default "
                             "$ENDOR_CACHE/bench-e2e or ~/.cache/endor/bench-e2e; --quick: a "
                             "temporary directory, removed)")


def _config(opts: Options):
    # lazy: heavy (transformers/accelerate), kept out of `import endor` and `endor --help`
    from transformers import LlamaConfig

    shape = {k: getattr(opts, k) or (QUICK_SHAPE if opts.quick else DEFAULT_SHAPE)[k]
             for k in DEFAULT_SHAPE}
    return LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                       num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                       num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
                       tie_word_embeddings=True, max_position_embeddings=4096,
                       architectures=["LlamaForCausalLM"]), shape


def _prepare(config, opts: Options, workdir: Path) -> dict:
    """Synthetic HF checkpoint -> converted "endor" and "dense" checkpoints (cached by shape)."""
    key = hashlib.sha256(json.dumps([config.to_dict(), opts.dtype, opts.sparsity],
                                    sort_keys=True, default=str).encode()).hexdigest()[:12]
    root = workdir / f"llama-{key}"
    hf = root / "hf"
    if not (hf / "config.json").is_file():
        write_synthetic_checkpoint(hf, config, dtype=getattr(torch, opts.dtype))
    out = {weights: root / weights for weights in ("endor", "dense")}
    _convert_all(hf, {w: o for w, o in out.items() if not (o / "endor.json").is_file()},
                 opts.sparsity)
    return out


_CONVERT_CHILD = ("import sys; from endor.convert import convert; convert(sys.argv[1], "
                  "sys.argv[2], method='magnitude', sparsity=float(sys.argv[3]), "
                  "weights=sys.argv[4], progress=False)")


def _convert_all(hf: Path, outs: dict, sparsity: float, *, parallel: bool | None = None) -> None:
    """Prune and convert `hf` to each {weights: out dir}. convert runs on one thread, so on a
    machine with cores to spare (default: 8 or more; the GPU host) the conversions run at once,
    in child processes: the device check's first run builds its checkpoints in half the time."""
    if parallel is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
        parallel = cores >= 8
    if not parallel or len(outs) < 2:
        for weights, out in outs.items():
            convert(hf, out, method="magnitude", sparsity=sparsity, weights=weights,
                    progress=False)
        return

    env = dict(os.environ)  # the children import this very endor, installed or not
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[2]),
                                                      env.get("PYTHONPATH")]))
    children = [subprocess.Popen([sys.executable, "-c", _CONVERT_CHILD, str(hf), str(out),
                                  repr(float(sparsity)), weights], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                for weights, out in outs.items()]
    errors = []
    try:
        for child, weights in zip(children, outs):
            _, err = child.communicate()
            if child.returncode:
                errors.append(f"converting to {weights} weights failed "
                              f"(exit {child.returncode}):\n{err[-3000:]}")
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    if errors:
        raise RuntimeError("\n".join(errors))


def _shards(path) -> tuple[list[Path], Path]:
    """(the decoder layers' shards, in order; the "rest" shard)."""
    layers, rest = layer_files(Checkpoint(path))
    return [Path(f.path) for f in layers], Path(rest.path)


def _generate(model, prompt, new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
    return out[0, prompt.shape[1]:].tolist()


def _time(models: dict, prompt, opts: Options) -> dict:
    """Runs interleaved (every system once per round, so slow drifts in the shared disk and CPUs
    hit all alike), each after evicting its files. Per system: (Stats of decode seconds per
    token, the median run's stats, its tokens, whether eviction worked). With --max-seconds,
    a timed round that the last round's duration says would end past it is not started (one
    timed round always runs)."""
    runs = {name: [] for name in models}
    cold = dict.fromkeys(models, True)
    start = last = time.perf_counter()
    limit = opts.max_seconds
    for i in range(opts.warmup + opts.repeat):
        now = time.perf_counter()
        if limit and i > opts.warmup and now + (now - last) - start > limit:
            break
        last = now
        for name, (model, files) in models.items():
            cold[name] &= harness.evict_files(files)
            model.endor_reset_stats()
            tokens = _generate(model, prompt, opts.new_tokens)
            if i >= opts.warmup:
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


def _disk_row(files, opts: Options) -> dict:
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


def _h2d_row(files, opts: Options) -> dict:
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


def _check_args(opts: Options) -> list[str]:
    """Fail on bad options before the (slow) checkpoint preparation. Returns the systems."""
    if opts.new_tokens < 2 or not 0 < opts.budget_fraction <= 1 or opts.prefetch < 0 or \
            (opts.endor_prefetch or 0) < 0:
        raise ValueError("--new-tokens must be >= 2, --budget-fraction in (0, 1], "
                         "--prefetch and --endor-prefetch >= 0")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device (torch "
                         f"{torch.__version__}, CUDA {torch.version.cuda}); use --device cpu")
    if opts.offload == "cpu" and opts.device == "cpu":
        raise ValueError("--offload cpu needs --device cuda: computing on the CPU, weights "
                         "held in RAM are not offloaded (Accelerate refuses it too)")
    allowed = DISK_SYSTEMS if opts.offload == "disk" else CPU_SYSTEMS
    systems = [s.strip() for s in (opts.systems or ",".join(allowed)).split(",") if s.strip()]
    unknown = set(systems) - set(allowed)
    if unknown or not systems:
        raise ValueError(f"unknown systems {sorted(unknown)} for --offload {opts.offload}; "
                         f"choose from {','.join(allowed)}")
    return with_checks(systems, parse_checks(opts.checks))


def _workdir(opts: Options) -> tuple[Path, Path | None]:
    if opts.workdir:
        return Path(opts.workdir), None
    if opts.quick:
        temp = Path(tempfile.mkdtemp(prefix="endor-e2e-"))
        return temp, temp
    return Path(os.environ.get("ENDOR_CACHE", Path.home() / ".cache" / "endor")) / \
        "bench-e2e", None


def _ratios(by: dict, rounds: dict) -> dict:
    ratios = {}
    if "dense" in by and "endor" in by:
        ideal_s = by["dense"]["s_per_token"] * by["endor"]["mb_read_per_token"] / \
            by["dense"]["mb_read_per_token"]
        ratios["ideal_s"] = ideal_s
        ratios["endor_vs_dense"] = by["dense"]["s_per_token"] / by["endor"]["s_per_token"]
        ratios["endor_vs_ideal_time"] = by["endor"]["s_per_token"] / ideal_s
        ratios["bytes_dense_vs_endor"] = by["dense"]["mb_read_per_token"] / \
            by["endor"]["mb_read_per_token"]
    for acc in ("accelerate", "accelerate-cold", "accelerate-warm"):
        if acc in by and "endor" in by:
            ratios[f"endor_vs_{acc.replace('-', '_')}"] = \
                by[acc]["s_per_token"] / by["endor"]["s_per_token"]
    # The same ratios within each round (runs of one round are back to back), median over
    # rounds: robust to the shared disk getting slower or faster between rounds.
    for other in ("dense", "accelerate", "accelerate-cold", "accelerate-warm"):
        if other in rounds and "endor" in rounds:
            ratios[f"endor_vs_{other.replace('-', '_')}_paired"] = statistics.median(
                o / e for o, e in zip(rounds[other], rounds["endor"]))
    return ratios


def run(**options) -> dict:
    """`options`: every field of Options, as keywords."""
    opts = Options(**options)
    if opts.moe:
        from .e2e_moe import run_moe  # local: e2e_moe builds on this module's helpers
        return run_moe(opts)
    if opts.new_tokens is None:
        opts = replace(opts, new_tokens=4 if opts.quick else 8)
    systems = _check_args(opts)
    device = torch.device(opts.device)
    config, shape = _config(opts)
    workdir, temp = _workdir(opts)
    try:
        t0 = time.perf_counter()
        paths = _prepare(config, opts, workdir)
        prepare_s = time.perf_counter() - t0
        (dense_files, dense_rest), (endor_files, _) = _shards(paths["dense"]), \
            _shards(paths["endor"])
        model_bytes = sum(f.stat().st_size for f in (*dense_files, dense_rest))
        budget = int(opts.budget_fraction * model_bytes)
        # A large vocabulary on few layers (the device check's 4-layer 7B shape) puts the
        # embeddings above the fraction: then the least possible, every decoder layer streamed.
        least = budget < dense_rest.stat().st_size
        budget = 0 if least else budget
        prompt = torch.randint(config.vocab_size, (1, opts.prompt_len),
                               generator=torch.Generator().manual_seed(0)).to(device)
        # The compute threads our pipeline uses are given to Accelerate too, so only the
        # loading strategy differs (and one thread computes faster than two on a busy 2-core
        # machine). None on the GPU.
        threads = thread_split(device, True)[0]
        # Held in RAM (--offload cpu), nothing is read from disk: no page cache to evict.
        disk = opts.offload == "disk"
        models = {}
        try:
            for system in systems:
                pipeline, verify = base_system(system)
                if pipeline in ("endor", "dense"):
                    prefetch = opts.prefetch if pipeline == "dense" or \
                        opts.endor_prefetch is None else opts.endor_prefetch
                    model = load_model(paths[pipeline], device=device, max_memory=budget,
                                       offload=opts.offload, prefetch=prefetch,
                                       direct_io=opts.io == "direct", verify=verify)
                    files = endor_files if pipeline == "endor" else dense_files
                else:
                    model = load_accelerate(paths["dense"], device=device, max_memory=budget,
                                            offload=opts.offload, compute_threads=threads)
                    files = dense_files
                    if system == "accelerate-cold":
                        evict_on_read(model)
                models[system] = (model, files if disk else [])
            timed = _time(models, prompt, opts)
        finally:
            for model, _ in models.values():
                model.endor_close()
            models.clear()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows, reference = [], None
        for system in systems:
            t, stats, tokens, cold = timed[system]
            reference = reference if reference is not None else tokens
            rows.append(_row(system, t, stats, tokens, reference, cold and disk))
        by = {r["system"]: r for r in rows}
        ratios = {**_ratios(by, timed["_rounds"]), **checks_ratios(by, timed["_rounds"])}
        if "ideal_s" in ratios:
            ideal_s = ratios.pop("ideal_s")
            rows.append({"system": "ideal", "decode_tokens_per_s": 1.0 / ideal_s,
                         "s_per_token": ideal_s,
                         "mb_read_per_token": by["endor"]["mb_read_per_token"]})
        if disk:
            rows.append(_disk_row(dense_files, opts))
        if device.type == "cuda":
            rows.append(_h2d_row(dense_files, opts))
        met = checks_met(ratios)
        if "endor_vs_dense" in ratios:
            met["endor_vs_dense"] = ratios["endor_vs_dense"] >= DONE_WHEN["endor_vs_dense_min"]
            met["endor_vs_ideal"] = ratios["endor_vs_ideal_time"] <= \
                DONE_WHEN["endor_vs_ideal_time_max"]
        baseline = "endor_vs_accelerate_cold" if disk else "endor_vs_accelerate"
        if baseline in ratios:
            met["endor_vs_accelerate"] = ratios[baseline] >= DONE_WHEN["endor_vs_accelerate_min"]
        params = {"shape": shape, "dtype": opts.dtype, "sparsity": opts.sparsity,
                  "device": str(device), "offload": opts.offload,
                  "model_bytes": model_bytes, "budget_bytes": budget, "budget_least": least,
                  "budget_fraction": opts.budget_fraction, "new_tokens": opts.new_tokens,
                  "prompt_len": opts.prompt_len, "prefetch": opts.prefetch,
                  "endor_prefetch": opts.endor_prefetch, "io": opts.io,
                  "repeat": opts.repeat, "warmup": opts.warmup, "quick": opts.quick,
                  "max_seconds": opts.max_seconds, "checks": opts.checks,
                  "torch_threads": torch.get_num_threads(), "prepare_s": prepare_s}
        return harness.envelope(NAME, params, rows, ratios=ratios,
                                done_when={**DONE_WHEN, "checks_cost_max": COST_MAX},
                                met=met, rounds_s_per_token=timed["_rounds"],
                                table_columns=TABLE_COLUMNS)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)

