"""`endor bench convert --methods ...`: seconds per billion parameters and peak memory of each
pruning method, on a synthetic checkpoint with the layer shapes of a 70B model (hidden 8192, MLP
28672, vocabulary 128256, 64 heads / 8 KV heads; a few decoder layers so it fits the disk) and
on the embedded models.

Each conversion runs in a child process (`endor convert`'s library call), so its peak RSS
(getrusage of that child) is its own; on a GPU the child also reports torch's peak allocated
GPU memory. Seconds per billion parameters = wall time / (parameters of the source / 1e9): for
the 70B-shaped checkpoint, the embeddings and head (2.1 B parameters) weigh in too, so read its
row with the layer count beside it. The synthetic checkpoint gets the SmolLM2 tokenizer (ids
below 49152, inside the 128256 vocabulary) so that calibrated methods can run on it."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

SHAPE_70B = dict(hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
                 num_key_value_heads=8, vocab_size=128256)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt")
SCALE_COLUMNS = ["case", "method", "device", "params_b", "seconds", "s_per_b_params",
                 "peak_rss_gb", "peak_gpu_gb", "calib"]

# The child: converts, then writes the run info and the peak GPU memory as JSON.
_CHILD = """
import json, sys, torch
from endor.convert import convert
kwargs = json.loads(sys.argv[3])
summary = convert(sys.argv[1], sys.argv[2], progress=False, resume=False, **kwargs)
peak_gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
print("ENDOR-RESULT " + json.dumps({**summary["run"], "peak_gpu": peak_gpu}))
"""


def synthetic_70b(out: Path, layers: int):
    """A random-weight bf16 checkpoint with 70B layer shapes and `layers` decoder layers."""
    import torch
    from transformers import LlamaConfig

    from ..convert.synthetic import write_synthetic_checkpoint
    from ..data.models import resolve_model

    config = LlamaConfig(**SHAPE_70B, num_hidden_layers=layers, tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"])
    write_synthetic_checkpoint(out, config, dtype=torch.bfloat16)
    tokenizer_dir = resolve_model("smollm2")
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, out / name)
    return out


def source_params(src: Path) -> int:
    from ..convert.endor_source import open_source

    source = open_source(src)
    return sum(_numel(source.shape(n)) for n in source.names())


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def convert_in_child(src: Path, out: Path, log: Path, **kwargs) -> dict:
    from .convert import run_child

    child = run_child([sys.executable, "-c", _CHILD, str(src), str(out), json.dumps(kwargs)], log)
    text = log.read_text(errors="replace")
    if child["returncode"] != 0:
        raise RuntimeError(f"conversion failed ({child['returncode']}):\n{text[-4000:]}")
    line = next(ln for ln in text.splitlines() if ln.startswith("ENDOR-RESULT "))
    return {**child, **json.loads(line.removeprefix("ENDOR-RESULT "))}


def run_scale(args, methods: list[str], models: list[str]) -> tuple[list[dict], dict]:
    """One row per (model, method)."""
    from . import harness

    work = Path(tempfile.mkdtemp(prefix="endor-bench-convert-", dir=args.workdir))
    results, sources = [], {}
    try:
        for model in models:
            if model == "70b":
                src = synthetic_70b(work / "src70b", args.layers)
                label = f"70B-shaped, {args.layers} layers"
            else:
                from ..data.models import resolve_model
                src, label = resolve_model(model), model
            params = source_params(src)
            sources[label] = {"params": params}
            for method in methods:
                calib = None
                kwargs = {"method": method, "sparsity": args.sparsity, "device": args.device}
                if method in ("wanda", "sparsegpt"):
                    kwargs |= {"calib_samples": args.calib_samples,
                               "calib_seqlen": args.calib_seqlen}
                    calib = f"{args.calib_samples}x{args.calib_seqlen}"
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                load = harness.system_load()
                t0 = time.perf_counter()
                r = convert_in_child(src, out, work / f"{method}.log", **kwargs)
                seconds = time.perf_counter() - t0
                results.append({
                    "case": label, "method": method, "device": r["device"],
                    "params_b": round(params / 1e9, 4), "seconds": round(seconds, 2),
                    "s_per_b_params": round(seconds / (params / 1e9), 2),
                    "peak_rss_gb": round(r["peak_rss"] / 1e9, 3),
                    "peak_rss_anon_gb": None if r["peak_rss_anon"] is None
                    else round(r["peak_rss_anon"] / 1e9, 3),
                    "peak_rss_file_gb": None if r["peak_rss_file"] is None
                    else round(r["peak_rss_file"] / 1e9, 3),
                    "peak_gpu_gb": None if r["peak_gpu"] is None else round(r["peak_gpu"] / 1e9, 3),
                    "calib": calib, "layers_per_s": r["layers_per_s"], "load_avg_before": load})
                shutil.rmtree(out, ignore_errors=True)
            if model == "70b":
                shutil.rmtree(src, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results, sources
