"""Relative RMS error of round-to-nearest int4 grids on the magnitude-pruned (50%) projections of
layers 0 and 10 (NOTES.md, session 7). usage: python grid-rtn.py gemma3-270m"""
import sys, math, torch
from pathlib import Path
DESIGN = Path(__file__).resolve().parents[4] / "scripts" / "quant-design.py"  # its helpers
exec(open(DESIGN).read().split("for alias in")[0])
torch.manual_seed(0)

def quant_offset(p, s, o):
    # levels +-(o + k) s, k = 0..7 ; p nonzero entries only matter
    a = p.abs() / s
    k = torch.round(a - o).clamp(0, 7)
    return torch.sign(p) * (o + k) * s

def quant_sym(p, s):
    q = torch.round(p / s).clamp(-8, 7)
    return q * s

def best(p, nz, fn, grid_params):
    # per-group search over scale factors (and params); p [rows, per, G]
    absmax = p.abs().amax(-1, keepdim=True)
    best_err = torch.full_like(absmax, float("inf")); best_d = torch.zeros_like(p)
    for par in grid_params:
        top = par["top"]
        for f in torch.linspace(1.0, 0.4, 31):
            s = (absmax * f / top).to(torch.bfloat16).float(); s = torch.where(s == 0, torch.ones_like(s), s)
            d = torch.where(nz, fn(p, s, **par["kw"]), 0)
            e = (d - p).square().sum(-1, keepdim=True)
            better = e < best_err
            best_err = torch.where(better, e, best_err); best_d = torch.where(better, d, best_d)
    return best_d

def run(alias):
    ws = [prune(w) for w in weights(alias)]
    ref = sum(float(w.square().sum()) for w in ws)
    variants = {
      "sym -8..7 (now)": (lambda p, s: quant_sym(p, s), [dict(top=7, kw={})]),
      "offset 0.5 (zero-free)": (quant_offset, [dict(top=7.5, kw=dict(o=0.5))]),
      "offset 1 (+-1..8)": (quant_offset, [dict(top=8, kw=dict(o=1.0))]),
      "offset t/8, 4 bits": (quant_offset, [dict(top=7 + t / 8, kw=dict(o=t / 8)) for t in range(16)]),
      "offset t/4, 4 bits": (quant_offset, [dict(top=7 + t / 4, kw=dict(o=t / 4)) for t in range(16)]),
    }
    for name, (fn, pars) in variants.items():
        err = 0.0
        for w in ws:
            rows, cols = w.shape; G = 128; per = -(-cols // G)
            p = torch.nn.functional.pad(w, (0, per * G - cols)).view(rows, per, G)
            d = best(p, p != 0, fn, pars)
            err += float((d - p).square().sum())
        print(f"{alias:12s} {name:24s} rel RMS {math.sqrt(err / ref):.4f}", flush=True)

for a in sys.argv[1:]:
    run(a)
