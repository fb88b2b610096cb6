"""`endor bench e2e --moe`: decode tokens/s of a mixture-of-experts model larger than its budget.

A Qwen3-MoE-shaped random model (default 12 layers, 64 experts, top-8, hidden 1024, expert MLP
768: 3.7 GB of bf16 weights) is pruned to 50% by magnitude (each expert on its own) and converted
twice, Endor and dense. Budget 10% of the model, weights on disk, page cache evicted before each
run, batch 1. Systems, interleaved per round:

  endor-experts        our runtime reading only the routed experts, LFU expert cache
  endor-experts-lru    the same with an LRU cache (which policy keeps more hits)
  endor-experts-nocache budget 0: every layer's attention+router and every chosen expert read
                       per token (bytes/token vs the ideal: attention + router + chosen experts)
  dense-experts        the dense checkpoint, routed expert reads, LFU cache
  endor-whole-layers   our pipeline streaming MoE layers whole (every expert, every token)
  accelerate-cold      HF Accelerate disk offload of the dense checkpoint, evicted per layer

Each under two routers by default: "uniform" (the random model's own router: no expert favoured
by its weights, though a random model's decode tokens repeat, so its choices do too: see the
rows' top_decile_share) and "zipf" (a fixed per-expert bias -zipf*ln(rank) added to the router's
logits, a random ranking per layer: popularity skewed as real routers' are); "random" on request
(every call's top-k drawn uniformly at random, seeded by the router's input bytes so every
system draws the same: the worst case for a cache). Done when, uniform router:
endor-experts >= 4x endor-whole-layers and >= 15x accelerate-cold, and no-cache bytes per token
<= 1.1x the ideal."""

from __future__ import annotations

import gc
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
import xxhash

from ..checkpoint import Checkpoint
from ..moe import parse_expert_name, use_eager_experts
from ..runtime import load_model
from ..runtime.model import thread_split
from ..runtime.weights import layer_files
from . import harness
from .baseline import evict_on_read, load_accelerate
from .e2e import Options, _convert_all, _generate, _row, _shards, _workdir
from .e2e_prepare import cache_lock, synthetic_source

NAME = "e2e"
DONE_WHEN = {"experts_vs_whole_layers_min": 4.0, "experts_vs_accelerate_min": 15.0,
             "nocache_bytes_vs_ideal_max": 1.1}
SYSTEMS = ("endor-experts", "endor-experts-lru", "endor-experts-nocache", "dense-experts",
           "endor-whole-layers", "accelerate-cold")
ROUTERS = ("uniform", "zipf", "random")
DEFAULT_ROUTERS = ("uniform", "zipf")
DEFAULT_MOE_SHAPE = dict(hidden=1024, expert_intermediate=768, experts=64, top_k=8, layers=12,
                         heads=16, kv_heads=4, vocab=16384)
QUICK_MOE_SHAPE = dict(hidden=128, expert_intermediate=96, experts=16, top_k=4, layers=3,
                       heads=4, kv_heads=2, vocab=1024)
TABLE_COLUMNS = ["system", "decode_tokens_per_s", "s_per_token", "n", "mb_read_per_token",
                 "expert_hit_rate", "top_decile_share", "read_ms", "decompress_ms", "compute_ms",
                 "stall_ms", "tokens_match"]


def add_moe_arguments(parser) -> None:
    group = parser.add_argument_group("--moe (mixture of experts)")
    group.add_argument("--moe", action="store_true",
                       help="benchmark a Qwen3-MoE-shaped model with routed expert reads")
    for key, value in DEFAULT_MOE_SHAPE.items():
        if key in ("hidden", "layers", "heads", "kv_heads", "vocab"):
            continue  # shared with the dense e2e options
        group.add_argument(f"--{key.replace('_', '-')}", type=int, default=None,
                           help=f"MoE shape (default {value}; --quick {QUICK_MOE_SHAPE[key]})")
    group.add_argument("--zipf", type=float, default=1.0,
                       help="skew of the zipf router: logit bias -zipf*ln(rank) (default 1.0)")
    group.add_argument("--routers", default=",".join(DEFAULT_ROUTERS),
                       help=f"routers to run, from {','.join(ROUTERS)} (default "
                            f"{','.join(DEFAULT_ROUTERS)})")
    group.add_argument("--moe-systems", default=None,
                       help=f"subset of {','.join(SYSTEMS)} (default all)")


def _config(opts: Options):
    from transformers import Qwen3MoeConfig

    base = QUICK_MOE_SHAPE if opts.quick else DEFAULT_MOE_SHAPE
    shape = {k: getattr(opts, k) or base[k] for k in DEFAULT_MOE_SHAPE}
    config = Qwen3MoeConfig(
        hidden_size=shape["hidden"], intermediate_size=4 * shape["hidden"],
        moe_intermediate_size=shape["expert_intermediate"], num_experts=shape["experts"],
        num_experts_per_tok=shape["top_k"], num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        head_dim=shape["hidden"] // shape["heads"], vocab_size=shape["vocab"],
        decoder_sparse_step=1, norm_topk_prob=True, tie_word_embeddings=True,
        max_position_embeddings=4096, architectures=["Qwen3MoeForCausalLM"])
    return config, shape


def _prepare(config, opts: Options, workdir: Path) -> dict:
    root, hf = synthetic_source(config, opts, workdir, "qwen3moe")
    out = {weights: root / weights for weights in ("endor", "dense")}
    with cache_lock(root):
        _convert_all(hf, {w: o for w, o in out.items() if not (o / "endor.json").is_file()},
                     opts.sparsity)
    return out


def skew_routers(model, zipf: float, seed: int = 0) -> list:
    """Add -zipf*ln(rank_e) to every router's logits (rank: a random permutation per layer),
    recomputing its top-k as the router does. A forward hook, so it works whatever loads the
    weights (our runtime, Accelerate's hooks). Returns the handles."""
    handles = []
    g = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if not (hasattr(module, "top_k") and hasattr(module, "num_experts")
                and name.endswith(".gate")):
            continue
        rank = torch.randperm(module.num_experts, generator=g).float() + 1.0
        bias = -zipf * rank.log()

        def hook(mod, args, out, bias=bias):
            logits = out[0] + bias.to(out[0].dtype)
            probs = torch.softmax(logits, dtype=torch.float, dim=-1)
            top, index = torch.topk(probs, mod.top_k, dim=-1)
            if getattr(mod, "norm_topk_prob", True):
                top /= top.sum(dim=-1, keepdim=True)
            return logits, top.to(logits.dtype), index

        handles.append(module.register_forward_hook(hook))
    return handles


def randomize_routers(model) -> list:
    """Replace every router's choice by top_k experts drawn uniformly at random, seeded by the
    router's input bytes (identical across systems computing identical hidden states), with
    the router's own softmax weights of the drawn experts. A forward hook, as skew_routers."""
    handles = []
    for name, module in model.named_modules():
        if not (hasattr(module, "top_k") and hasattr(module, "num_experts")
                and name.endswith(".gate")):
            continue

        def hook(mod, args, out):
            logits = out[0]
            x = args[0].detach().contiguous().view(torch.uint8).cpu()
            seed = xxhash.xxh3_64_intdigest(memoryview(x.numpy()))
            g = torch.Generator().manual_seed(seed & (2**63 - 1))
            draws = torch.rand(logits.shape, generator=g)
            index = torch.topk(draws, mod.top_k, dim=-1).indices.to(logits.device)
            probs = torch.softmax(logits, dtype=torch.float, dim=-1)
            top = probs.gather(-1, index)
            if getattr(mod, "norm_topk_prob", True):
                top /= top.sum(dim=-1, keepdim=True)
            return logits, top.to(logits.dtype), index

        handles.append(module.register_forward_hook(hook))
    return handles


def record_choices(model) -> tuple[list, list]:
    """Hooks that append (layer name, chosen expert indices) per router call."""
    seen, handles = [], []
    for name, module in model.named_modules():
        if hasattr(module, "top_k") and name.endswith(".gate"):
            handles.append(module.register_forward_hook(
                lambda mod, args, out, name=name: seen.append((name, out[2].clone()))))
    return seen, handles


def top_decile_share(choices: list, num_experts: int) -> float | None:
    """Of the decode tokens' expert picks, the share that went to each layer's most picked
    10% of experts (uniform routing: about 0.1 plus noise)."""
    counts: dict = {}
    for name, idx in choices:
        if idx.shape[0] == 1:
            layer = counts.setdefault(name, {})
            for e in idx.flatten().tolist():
                layer[e] = layer.get(e, 0) + 1
    picks = top = 0
    for name, layer in counts.items():
        num = max(1, round(0.1 * num_experts))
        ranked = sorted(layer.values(), reverse=True)
        picks += sum(ranked)
        top += sum(ranked[:num])
    return top / picks if picks else None


def _ideal_bytes(path, choices: list, decode_tokens: int) -> float:
    """Attention + router + norms (every non-expert tensor of a layer) + the chosen experts'
    stored bytes, per decode token: what a token must read with no cache at all."""
    files, _ = layer_files(Checkpoint(path))
    core, experts = {}, {}
    for i, f in enumerate(files):
        sizes = {}
        core[i] = 0
        for n in f.keys():
            nbytes = sum(e - s for s, e in f.byte_ranges(n))
            parsed = parse_expert_name(n)
            if parsed is None:
                core[i] += nbytes
            else:
                sizes[parsed[1]] = sizes.get(parsed[1], 0) + nbytes
        experts[i] = sizes
    total = 0
    decode = [(n, idx) for n, idx in choices if idx.shape[0] == 1]
    for name, idx in decode:
        i = int(name.split(".layers.")[1].split(".")[0])
        total += core[i] + sum(experts[i][e] for e in idx.unique().tolist())
    return total / decode_tokens


def _load(system: str, paths: dict, budget: int, opts: Options, threads):
    if system == "accelerate-cold":
        model = load_accelerate(paths["dense"], max_memory=budget, compute_threads=threads)
        use_eager_experts(model)  # the same expert-by-expert arithmetic as ours
        evict_on_read(model)
        return model
    weights = "dense" if system.startswith("dense") else "endor"
    return load_model(paths[weights], max_memory=0 if system.endswith("nocache") else budget,
                      prefetch=opts.prefetch, expert_reads=system != "endor-whole-layers",
                      expert_cache="lru" if system.endswith("lru") else "lfu")


def _time(models: dict, prompt, opts: Options, num_experts: int) -> dict:
    runs = {name: [] for name in models}
    start = last = time.perf_counter()
    for i in range(opts.warmup + opts.repeat):
        now = time.perf_counter()
        if opts.max_seconds and i > opts.warmup and now + (now - last) - start > opts.max_seconds:
            break
        last = now
        for name, (model, files, choices) in models.items():
            harness.evict_files(files)
            model.endor_reset_stats()
            choices.clear()
            tokens = _generate(model, prompt, opts.new_tokens)
            if i >= opts.warmup:
                stats = model.endor_stats()
                ideal = _ideal_bytes(model.endor_stats()["path"], choices,
                                     stats["decode_tokens"]) if name.endswith("nocache") \
                    else None
                stats["top_decile_share"] = top_decile_share(choices, num_experts)
                runs[name].append((stats["decode_s"] / stats["decode_tokens"], stats, tokens,
                                   ideal))
    out = {}
    for name, rs in runs.items():
        per_token = sorted(r[0] for r in rs)
        median = sorted(rs, key=lambda r: r[0])[len(rs) // 2]
        out[name] = (harness.Stats(statistics.median(per_token), per_token[0], per_token[-1],
                                   len(rs)), *median[1:])
    return out


def run_moe(opts: Options) -> dict:
    """e2e.run(moe=True, ...): the options of e2e.Options."""
    if opts.device != "cpu" or opts.offload != "disk":
        raise ValueError("--moe runs with --device cpu --offload disk")
    if opts.new_tokens is None:
        opts = replace(opts, new_tokens=4 if opts.quick else 8)
    systems = [s for s in (opts.moe_systems or ",".join(SYSTEMS)).split(",") if s]
    routers = [r for r in opts.routers.split(",") if r]
    if set(systems) - set(SYSTEMS) or set(routers) - set(ROUTERS) or not systems or not routers:
        raise ValueError(f"--moe-systems from {','.join(SYSTEMS)}; --routers from "
                         f"{','.join(ROUTERS)}")
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
        prompt = torch.randint(config.vocab_size, (1, opts.prompt_len),
                               generator=torch.Generator().manual_seed(0))
        threads = thread_split(torch.device("cpu"), True)[0]
        rows, ratios = [], {}
        for router in routers:
            models = {}
            try:
                for system in systems:
                    model = _load(system, paths, budget, opts, threads)
                    if router == "zipf":
                        skew_routers(model, opts.zipf)
                    elif router == "random":
                        randomize_routers(model)
                    choices, _ = record_choices(model)
                    files = endor_files if system.startswith("endor") else dense_files
                    if system == "accelerate-cold":  # the fused experts it wrote at load too
                        files = [*files, *(p for ps in model.endor_offloaded.values()
                                           for p in ps)]
                    models[system] = (model, files, choices)
                timed = _time(models, prompt, opts, shape["experts"])
            finally:
                for model, _, _ in models.values():
                    model.endor_close()
                models.clear()
                gc.collect()
            reference = None
            by = {}
            for system in systems:
                t, stats, tokens, ideal = timed[system]
                reference = reference if reference is not None else tokens
                row = _row(f"{system}/{router}", t, stats, tokens, reference, True)
                row["router"] = router
                for key in ("top_decile_share", "expert_hit_rate", "expert_hits",
                            "expert_misses", "expert_cache_capacity_bytes",
                            "expert_cache_policy"):
                    if key in stats:
                        row[key] = stats[key]
                if ideal:
                    row["ideal_mb_read_per_token"] = ideal / 1e6
                    ratios[f"nocache_bytes_vs_ideal/{router}"] = \
                        stats["bytes_read_per_token"] / ideal
                rows.append(row)
                by[system] = row
            for other in ("endor-whole-layers", "accelerate-cold", "dense-experts",
                          "endor-experts-lru"):
                if other in by and "endor-experts" in by:
                    ratios[f"experts_vs_{other}/{router}"] = \
                        by[other]["s_per_token"] / by["endor-experts"]["s_per_token"]
        met = {}
        for key, limit in (("experts_vs_endor-whole-layers/uniform", "experts_vs_whole_layers_min"),
                           ("experts_vs_accelerate-cold/uniform", "experts_vs_accelerate_min")):
            if key in ratios:
                met[key] = ratios[key] >= DONE_WHEN[limit]
        if "nocache_bytes_vs_ideal/uniform" in ratios:
            met["nocache_bytes_vs_ideal"] = ratios["nocache_bytes_vs_ideal/uniform"] <= \
                DONE_WHEN["nocache_bytes_vs_ideal_max"]
        params = {"moe": True, "shape": shape, "dtype": opts.dtype, "sparsity": opts.sparsity,
                  "device": "cpu", "offload": "disk", "model_bytes": model_bytes,
                  "budget_bytes": budget, "budget_fraction": opts.budget_fraction,
                  "new_tokens": opts.new_tokens, "prompt_len": opts.prompt_len,
                  "prefetch": opts.prefetch, "zipf": opts.zipf, "routers": routers,
                  "repeat": opts.repeat, "warmup": opts.warmup, "quick": opts.quick,
                  "torch_threads": torch.get_num_threads(), "prepare_s": prepare_s}
        return harness.envelope(NAME, params, rows, ratios=ratios, done_when=DONE_WHEN, met=met,
                                table_columns=TABLE_COLUMNS)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)
