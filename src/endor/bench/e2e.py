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
  ram-dense        the dense checkpoint wholly in RAM through plain transformers (no offload)
  ram-endor-V      the Endor checkpoint (codec V) wholly in RAM, held compressed, fused compute

"endor" is one system per value codec (--values raw,exp,int4: one checkpoint each, the same
mask) and compute (--compute dense,fused): endor-<values>-<compute> (bench/e2e_variants.py,
which also defines the ratios). --batch 1,2,4,... times every system at each batch size (one
generate call of that many prompts; tokens/s counts every prompt).

--device cuda computes on the GPU (random weights, pruning and conversion still on the CPU);
--offload cpu holds the streamed layers in host RAM instead of reading them from disk (our
pipeline: the shards' bytes, pinned; Accelerate: its "cpu" device_map entries), and then the
Accelerate baseline is one system, "accelerate" (nothing to evict).

Runs are interleaved (one of each system per round). Each row reports the median seconds per
decode token over --repeat runs (after --warmup), the bytes read per token and the GB/s that
makes, and (ours) the busy time of each pipeline stage.
Every row's tokens are compared with the same weights held in memory (dense compute): the
dense checkpoint for dense rows, the codec's checkpoint for Endor rows (int4 is lossy: its
reference is the int4 model). Fused compute sums in another order than torch (the bound is in
kernels/fused.py), so its tokens may differ where two logits are that close. Done when:
e2e_variants.DONE_WHEN."""

from __future__ import annotations

import gc
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..runtime import load_model
from ..runtime.fused import fused_codecs
from ..runtime.model import thread_split
from ..runtime.weights import layer_files
from . import e2e_budget
from . import e2e_variants as variants
from . import harness
from .baseline import evict_on_read, load_accelerate
from .e2e_limits import disk_row, h2d_row
from .e2e_prepare import convert_all as _convert_all  # noqa: F401  (e2e_moe, tests)
from .e2e_prepare import prepare
from .e2e_variants import Variant
from .e2e_checks import COST_MAX, base_system, checks_met, checks_ratios, parse_checks

NAME = "e2e"
DONE_WHEN = variants.DONE_WHEN
DISK_SYSTEMS = ("endor", "dense", "accelerate-cold", "accelerate-warm")
CPU_SYSTEMS = ("endor", "dense", "accelerate")
RAM_SYSTEMS = ("ram-dense", "ram-endor")  # everything resident: what compute alone costs
# Timed unless --systems says otherwise: with the default codecs and computes, 8 systems a round,
# about 6 minutes in all on our 2-core machine (accelerate-warm and the in-RAM rows took the
# run past 12 minutes at load 10).
DEFAULT_DISK_SYSTEMS = ("endor", "dense", "accelerate-cold")
TABLE_COLUMNS = ["system", "batch", "decode_tokens_per_s", "s_per_token", "min_s", "max_s", "n",
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
    values: str = "raw,exp,int4"
    compute: str = "dense,fused"
    batch: list[int] | str = "1"
    checks: str = "on"  # bench/e2e_checks.py
    plan_budgets: str = "0.25,0.5"  # bench/e2e_budget.py
    # --moe (bench/e2e_moe.py): a mixture-of-experts model with routed expert reads
    moe: bool = False
    expert_intermediate: int | None = None
    experts: int | None = None
    top_k: int | None = None
    zipf: float = 1.0
    routers: str = "uniform,zipf"
    moe_systems: str | None = None


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
    parser.add_argument("--values", default="raw,exp,int4",
                        help="value codecs of the Endor checkpoints, comma-separated (one "
                             f"conversion each; {','.join(variants.VALUES)}; default "
                             "raw,exp,int4; int4/int8 by round-to-nearest, lossy)")
    parser.add_argument("--compute", default="dense,fused",
                        help="compute of the Endor systems, comma-separated (dense, fused, "
                             "auto; default dense,fused)")
    parser.add_argument("--batch", type=harness.int_list, default=[1],
                        help="prompts per generate call, comma-separated: one row per system "
                             "and batch size, tokens/s counting every prompt (default 1)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the model computes (default cpu)")
    parser.add_argument("--offload", choices=("disk", "cpu"), default="disk",
                        help="where streamed layers live between uses: disk (read cold every "
                             "token) or cpu (host RAM; needs --device cuda). Default disk")
    parser.add_argument("--systems", default=None,
                        help="comma-separated subset to time (default, --offload disk: "
                             f"{','.join(DEFAULT_DISK_SYSTEMS)}; --offload cpu: "
                             f"{','.join(CPU_SYSTEMS)}); also accelerate-warm, "
                             f"{','.join(RAM_SYSTEMS)}")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop timing rounds once the next would end past this many seconds "
                             "(at least one timed round; the rows' n says how many ran)")
    parser.add_argument("--checks", default="on",
                        help="on (default), off or on,off: time our pipelines with checksums "
                             "verified, not verified (load_model(verify=False)), or both in the "
                             "same interleaved rounds, reporting what checking costs")
    parser.add_argument("--plan-budgets", default="0.25,0.5",
                        help="budgets (fractions of the model's bytes, or none) at which to "
                             "report how many decoder layers the runtime keeps resident for the "
                             "dense and each Endor checkpoint, from its own plan (default "
                             "0.25,0.5; nothing is timed)")
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


def _shards(path) -> tuple[list[Path], Path]:
    """(the decoder layers' shards, in order; the "rest" shard)."""
    layers, rest = layer_files(Checkpoint(path))
    return [Path(f.path) for f in layers], Path(rest.path)


def _generate(model, prompt, new_tokens: int) -> list[list[int]]:
    """Greedy tokens of every prompt of the batch (all of one length: no padding)."""
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0,
                             attention_mask=torch.ones_like(prompt))
    return out[:, prompt.shape[1]:].tolist()


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


def _row(system, t: harness.Stats, stats: dict, tokens, reference, cold: bool,
         batch: int = 1) -> dict:
    """One system at one batch size; tokens/s counts every prompt (s_per_token is per step)."""
    row = {"system": variants.name_of(system), "batch": batch,
           "decode_tokens_per_s": batch / t.median_s, "s_per_token": t.median_s,
           "min_s": t.min_s, "max_s": t.max_s, "n": t.n}
    if isinstance(system, Variant):
        # whether the fused kernel read these values (else: decompressed per matrix, then GEMV)
        row.update(values=system.values, compute=stats.get("compute", system.compute),
                   ram=system.ram, fused_layers=stats.get("fused_layers", 0),
                   fused_reads_values=system.values in fused_codecs(torch.device(
                       stats.get("device", "cpu"))))
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


def _check_args(opts: Options) -> tuple[list, list[str]]:
    """Fail on bad options before the (slow) checkpoint preparation. Returns (the systems,
    endor expanded into its variants; the value codecs)."""
    if opts.new_tokens < 2 or not 0 < opts.budget_fraction <= 1 or opts.prefetch < 0 or \
            (opts.endor_prefetch or 0) < 0:
        raise ValueError("--new-tokens must be >= 2, --budget-fraction in (0, 1], "
                         "--prefetch and --endor-prefetch >= 0")
    if any(b < 1 for b in opts.batch):
        raise ValueError(f"--batch sizes must be >= 1, got {opts.batch}")
    if opts.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device (torch "
                         f"{torch.__version__}, CUDA {torch.version.cuda}); use --device cpu")
    if opts.offload == "cpu" and opts.device == "cpu":
        raise ValueError("--offload cpu needs --device cuda: computing on the CPU, weights "
                         "held in RAM are not offloaded (Accelerate refuses it too)")
    allowed = (DISK_SYSTEMS if opts.offload == "disk" else CPU_SYSTEMS) + RAM_SYSTEMS
    default = DEFAULT_DISK_SYSTEMS if opts.offload == "disk" else CPU_SYSTEMS
    systems = [s.strip() for s in (opts.systems or ",".join(default)).split(",") if s.strip()]
    unknown = set(systems) - set(allowed)
    if unknown or not systems:
        raise ValueError(f"unknown systems {sorted(unknown)} for --offload {opts.offload}; "
                         f"choose from {','.join(allowed)}")
    values = variants.parse_names(opts.values, variants.VALUES, "--values")
    computes = variants.parse_names(opts.compute, variants.COMPUTES, "--compute")
    return variants.with_checks(variants.expand(systems, values, computes),
                                parse_checks(opts.checks)), values


def _workdir(opts: Options) -> tuple[Path, Path | None]:
    if opts.workdir:
        return Path(opts.workdir), None
    if opts.quick:
        temp = Path(tempfile.mkdtemp(prefix="endor-e2e-"))
        return temp, temp
    return Path(os.environ.get("ENDOR_CACHE", Path.home() / ".cache" / "endor")) / \
        "bench-e2e", None


def _load(system, paths: dict, budget: int, threads, opts: Options):
    """(the model of `system`, the shards it reads per token)."""
    device = torch.device(opts.device)
    if isinstance(system, Variant):
        path = paths[system.values]
        if system.ram:  # nothing streams, nothing is read per token
            return load_model(path, device=device, max_memory=None, compute="fused"), []
        prefetch = opts.prefetch if opts.endor_prefetch is None else opts.endor_prefetch
        model = load_model(path, device=device, max_memory=budget, offload=opts.offload,
                           prefetch=prefetch, direct_io=opts.io == "direct",
                           compute=system.compute, verify=system.verify)
        return model, _shards(path)[0]
    if base_system(system)[0] == "dense":
        return load_model(paths["dense"], device=device, max_memory=budget, offload=opts.offload,
                          prefetch=opts.prefetch, direct_io=opts.io == "direct",
                          verify=base_system(system)[1]), _shards(paths["dense"])[0]
    if system == "ram-dense":  # plain transformers, every weight in RAM, all cores
        return load_accelerate(paths["dense"], device=device, max_memory=None), []
    model = load_accelerate(paths["dense"], device=device, max_memory=budget,
                            offload=opts.offload, compute_threads=threads)
    if system == "accelerate-cold":
        evict_on_read(model)
    return model, _shards(paths["dense"])[0]


def _references(systems, paths: dict, prompts: dict, opts: Options) -> dict:
    """Greedy tokens of each checkpoint's weights held in memory (dense compute), per batch size:
    what every row of those weights must generate."""
    needed = {"dense"} | {s.values for s in systems if isinstance(s, Variant)}
    out = {}
    for key in sorted(needed):
        model = load_model(paths[key], device=opts.device, max_memory=None, compute="dense")
        try:
            out[key] = {b: _generate(model, p, opts.new_tokens) for b, p in prompts.items()}
        finally:
            model.endor_close()
            del model
            gc.collect()
    return out


def run(**options) -> dict:
    """`options`: every field of Options, as keywords."""
    opts = Options(**options)
    if opts.moe:
        from .e2e_moe import run_moe  # local: e2e_moe builds on this module's helpers
        return run_moe(opts)
    if opts.new_tokens is None:
        opts = replace(opts, new_tokens=4 if opts.quick else 8)
    if isinstance(opts.batch, str):
        opts = replace(opts, batch=harness.int_list(opts.batch))
    systems, values = _check_args(opts)
    plan_fractions = e2e_budget.parse_fractions(opts.plan_budgets)
    load_at_start = harness.system_load()
    device = torch.device(opts.device)
    config, shape = _config(opts)
    workdir, temp = _workdir(opts)
    try:
        t0 = time.perf_counter()
        paths = prepare(config, opts, workdir, values)
        prepare_s = time.perf_counter() - t0
        dense_files, dense_rest = _shards(paths["dense"])
        model_bytes = sum(f.stat().st_size for f in (*dense_files, dense_rest))
        budget = int(opts.budget_fraction * model_bytes)
        # A large vocabulary on few layers (the device check's 4-layer 7B shape) puts the
        # embeddings above the fraction: then the least possible, every decoder layer streamed.
        least = budget < dense_rest.stat().st_size
        budget = 0 if least else budget
        prompts = {b: torch.randint(config.vocab_size, (b, opts.prompt_len),
                                    generator=torch.Generator().manual_seed(0)).to(device)
                   for b in opts.batch}
        references = _references(systems, paths, prompts, opts)
        # The compute threads our pipeline uses are given to Accelerate too, so only the
        # loading strategy differs (and one thread computes faster than two on a busy 2-core
        # machine). None on the GPU.
        threads = thread_split(device, True)[0]
        # Held in RAM (--offload cpu), nothing is read from disk: no page cache to evict.
        disk = opts.offload == "disk"
        models = {}
        try:
            for system in systems:
                model, files = _load(system, paths, budget, threads, opts)
                models[variants.name_of(system)] = (model, files if disk else [])
            timed = {b: _time(models, prompts[b], opts) for b in opts.batch}
        finally:
            for model, _ in models.values():
                model.endor_close()
            models.clear()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        # after the timings: these loads read resident layers, which would warm nothing timed
        plan = e2e_budget.memory_plan(paths, values, model_bytes, plan_fractions, device) \
            if plan_fractions else None
        rows = []
        for b in opts.batch:
            for system in systems:
                t, stats, tokens, cold = timed[b][variants.name_of(system)]
                weights = system.values if isinstance(system, Variant) else "dense"
                rows.append(_row(system, t, stats, tokens, references[weights][b],
                                 cold and disk and files_read(system), b))
        first = opts.batch[0]
        by = {r["system"]: r for r in rows if r["batch"] == first}
        ratios = {**variants.ratios(by, timed[first]["_rounds"]),
                  **checks_ratios(by, timed[first]["_rounds"])}
        ratios.update(variants.batch_ratios(rows))
        if "dense" in by:
            for v in values:
                best = by.get(ratios.get(f"{v}_best"))
                if best:
                    ideal_s = by["dense"]["s_per_token"] * best["mb_read_per_token"] / \
                        by["dense"]["mb_read_per_token"]
                    rows.append({"system": f"ideal-{v}", "batch": first, "values": v,
                                 "decode_tokens_per_s": first / ideal_s, "s_per_token": ideal_s,
                                 "mb_read_per_token": best["mb_read_per_token"]})
        if disk:
            rows.append(disk_row(dense_files, opts))
        if device.type == "cuda":
            rows.append(h2d_row(dense_files, opts))
        params = {"shape": shape, "dtype": opts.dtype, "sparsity": opts.sparsity,
                  "device": str(device), "offload": opts.offload,
                  "model_bytes": model_bytes, "budget_bytes": budget, "budget_least": least,
                  "budget_fraction": opts.budget_fraction, "new_tokens": opts.new_tokens,
                  "prompt_len": opts.prompt_len, "prefetch": opts.prefetch,
                  "endor_prefetch": opts.endor_prefetch, "io": opts.io, "values": values,
                  "compute": variants.parse_names(opts.compute, variants.COMPUTES, "--compute"),
                  "batch": list(opts.batch), "repeat": opts.repeat, "warmup": opts.warmup,
                  "quick": opts.quick, "max_seconds": opts.max_seconds, "checks": opts.checks,
                  "plan_budgets": plan_fractions,
                  "torch_threads": torch.get_num_threads(), "prepare_s": prepare_s,
                  "load_avg_at_start": load_at_start,
                  "checkpoint_bytes": {k: _checkpoint_bytes(p) for k, p in paths.items()}}
        return harness.envelope(NAME, params, rows, ratios=ratios,
                                done_when={**DONE_WHEN, "checks_cost_max": COST_MAX,
                                           **e2e_budget.DONE_WHEN},
                                met={**variants.met(ratios), **checks_met(ratios),
                                     **(plan["met"] if plan else {})},
                                memory_plan=plan,
                                rounds_s_per_token={b: timed[b]["_rounds"] for b in opts.batch},
                                table_columns=TABLE_COLUMNS)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def files_read(system) -> bool:
    """Whether the system reads shards per token (whose page-cache eviction then matters)."""
    return not (getattr(system, "ram", False) or system == "ram-dense")


def _checkpoint_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))
