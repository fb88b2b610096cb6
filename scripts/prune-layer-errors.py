"""Per-Linear output error of pruning (and int4 rounding) on two texts: the calibration text and
the evaluation text. Usage: prune-layer-errors.py [MODEL] [--layers 0,4,8] [--pattern 50%|2:4]
[--dampings 0.01,0.1] [--cache DIR]

For each decoder Linear W of the dense model, the relative output error of a pruned/rounded W'
on a text T is tr((W - W') G_T (W - W')^T) / tr(W G_T W^T), G_T = X^T X of the inputs W sees on
T (dense model, one forward per text, stopped after the last layer asked for). SparseGPT is
fitted to the calibration Gram only: an error far lower there than on the evaluation text says
it fits the calibration text's distribution rather than the layer. Prints one JSON line per
Linear, then per-method means (calibration, evaluation)."""
import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from endor.convert import calibrate
from endor.data.models import resolve_model
from endor.data.text import calibration_text, evaluation_text
from endor.format.codecs.quant import quantize
from endor.prune import CalibrationStats, prune_weight
from endor.prune.sparsegpt import sparsegpt_prune


class _Stop(Exception):
    pass


def grams(model, layers, tokens, skip: int = 0) -> dict:
    """{linear name: float32 X^T X} over `tokens` for the Linears of `layers`; names with the
    suffix "@skip" are the same without the first `skip` tokens of every segment."""
    stats, handles = {}, []
    blocks = model.model.layers
    for i in layers:
        for name, m in blocks[i].named_modules():
            if isinstance(m, torch.nn.Linear):
                full = f"model.layers.{i}.{name}"
                stats[full] = CalibrationStats(m.in_features, hessian=True)
                stats[full + "@skip"] = CalibrationStats(m.in_features, hessian=True)

                def hook(mod, args, a=stats[full], b=stats[full + "@skip"]):
                    a.update(args[0])
                    b.update(args[0][:, skip:])
                handles.append(m.register_forward_pre_hook(hook))

    def stop(mod, args, kwargs):
        raise _Stop
    last = max(layers)
    if last + 1 < len(blocks):
        handles.append(blocks[last + 1].register_forward_pre_hook(stop, with_kwargs=True))
    with torch.no_grad():
        for seg in tokens:
            try:
                model.model(input_ids=seg[None], use_cache=False)
            except _Stop:
                pass
    for h in handles:
        h.remove()
    return {n: s._gram for n, s in stats.items()} | {"nsamples": torch.tensor(
        next(iter(stats.values())).nsamples)}


def cached_grams(path: Path, compute) -> dict:
    if path.is_file():
        return load_file(path)
    g = compute()
    save_file(g, path)
    return g


def rel_error(w, w2, g):
    d = w2.double() - w.double()
    g = g.double()
    return float(torch.einsum("ij,jk,ik->", d, g, d) / torch.einsum("ij,jk,ik->", w.double(), g,
                                                                      w.double()))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model", nargs="?", default="smollm2")
    p.add_argument("--layers", default="0,4,8,12")
    p.add_argument("--pattern", default="50%")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--dampings", default="0.01", help="SparseGPT dampings to compare")
    p.add_argument("--int4", action="store_true", help="add the int4 rows (RTN and joint)")
    p.add_argument("--cache", default="/tmp/prune-layer-errors")
    p.add_argument("--skip", type=int, default=1,
                   help="also fit and score without the first SKIP tokens of every segment")
    args = p.parse_args()
    src = resolve_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    layers = [int(x) for x in args.layers.split(",")]
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    tag = f"{args.model}-{args.layers}-{args.calib_samples}-{args.skip}"
    g_cal = cached_grams(cache / f"{tag}-calib.safetensors", lambda: grams(
        model, layers, calibrate.segments(calibrate.tokenize(src, calibration_text()),
                                          args.calib_samples, 256), args.skip))
    g_ev = cached_grams(cache / f"{tag}-eval.safetensors", lambda: grams(
        model, layers, calibrate.segments(calibrate.tokenize(src, evaluation_text())[:16 * 512],
                                          16, 256), args.skip))
    nm = (2, 4) if args.pattern == "2:4" else None
    dampings = [float(d) for d in args.dampings.split(",")]
    means = defaultdict(list)
    for name in g_cal:
        if name == "nsamples" or name.endswith("@skip"):
            continue
        w = model.get_submodule(name).weight.detach().to(torch.bfloat16)
        st = CalibrationStats(w.shape[1], hessian=True)
        st._gram.copy_(g_cal[name])
        st.nsamples = int(g_cal["nsamples"])
        st.col_sq_norm.copy_(g_cal[name].diagonal())
        out = {m: prune_weight(w, method=m, sparsity=0.5, nm=nm, stats=st)
               for m in ("magnitude", "wanda")}
        for d in dampings:
            out[f"sparsegpt d={d:g}"] = sparsegpt_prune(w, st.hessian, sparsity=0.5, nm=nm,
                                                        damping=d)
        skipped = CalibrationStats(w.shape[1], hessian=True)
        skipped._gram.copy_(g_cal[name + "@skip"])
        skipped.nsamples = 1
        for d in dampings:
            out[f"sparsegpt d={d:g} skip"] = sparsegpt_prune(w, skipped.hessian, sparsity=0.5,
                                                             nm=nm, damping=d)
        if args.int4:
            out["wanda+rtn4"] = quantize(out["wanda"], 4, 128).dequantized
            for d in dampings:
                out[f"sparsegpt d={d:g} +rtn4"] = quantize(out[f"sparsegpt d={d:g}"], 4,
                                                           128).dequantized
                out[f"sparsegpt d={d:g} joint4"] = sparsegpt_prune(
                    w, st.hessian, sparsity=0.5, nm=nm, damping=d, quantize=(4, 128))[0]
        row = {"linear": name}
        for k, v in out.items():
            row[k] = tuple(round(rel_error(w, v, g), 5) for g in (
                g_cal[name], g_ev[name], g_cal[name + "@skip"], g_ev[name + "@skip"]))
            means[k].append(row[k])
        print(json.dumps(row), flush=True)
    print(f"{'mean relative error':28s} calib     eval      calib@skip eval@skip")
    for k, v in means.items():
        print(f"{k:28s} " + " ".join(f"{sum(x[i] for x in v) / len(v):.5f}  " for i in range(4)))


if __name__ == "__main__":
    sys.exit(main())
