"""The same error with one 16-level table per tensor fitted by Lloyd (NOTES.md, session 7).
usage: python grid-codebook-rtn.py gemma3-270m"""
import sys, math, torch
from pathlib import Path
DESIGN = Path(__file__).resolve().parents[4] / "scripts" / "quant-design.py"  # its helpers
exec(open(DESIGN).read().split("for alias in")[0])

def assign(x, c):
    # x [...], c [16] sorted -> nearest index
    mid = (c[1:] + c[:-1]) / 2
    return torch.bucketize(x, mid)

def codebook_quant(w, G=128, iters=15, sym_init=True):
    rows, cols = w.shape; per = -(-cols // G)
    p = torch.nn.functional.pad(w, (0, per * G - cols)).view(rows, per, G)
    nz = p != 0
    absmax = p.abs().amax(-1, keepdim=True)
    s = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    c = torch.arange(-8, 8).float() / 7
    for it in range(iters):
        x = p / s
        q = assign(x, c)
        # codebook update: c_k = sum s p / sum s^2 over assigned nonzeros
        ss = (s * s).expand_as(p)[nz]; sp = (s * p)[nz]; qq = q[nz]
        num = torch.zeros(16).index_add_(0, qq, sp); den = torch.zeros(16).index_add_(0, qq, ss)
        c = torch.where(den > 0, num / den.clamp_min(1e-30), c)
        c, _ = torch.sort(c)
        # scale update: search factor per group around current
        best_e = torch.full_like(s, float("inf")); best_s = s.clone()
        for f in torch.linspace(0.8, 1.2, 21):
            s2 = s * f
            d = torch.where(nz, c[assign(p / s2, c)] * s2, 0)
            e = (d - p).square().sum(-1, keepdim=True)
            b = e < best_e; best_e = torch.where(b, e, best_e); best_s = torch.where(b, s2, best_s)
        s = best_s
    s = s.to(torch.bfloat16).float(); c = c.to(torch.bfloat16).float()
    d = torch.where(nz, c[assign(p / s, c)] * s, 0)
    return d, p, c

def run(alias):
    ws = [prune(w) for w in weights(alias)]
    ref = sum(float(w.square().sum()) for w in ws); err = 0.0
    for w in ws:
        d, p, c = codebook_quant(w)
        err += float((d - p).square().sum())
    print(alias, "per-tensor 16-level codebook rel RMS", round(math.sqrt(err / ref), 4), [round(v, 3) for v in c.tolist()], flush=True)

for a in sys.argv[1:]:
    run(a)
