"""Group layout and symmetry of the int4/int8 codecs, measured: relative RMS error of round-to-
nearest on magnitude-pruned (50%) decoder weights of the embedded models, and bits/element."""
import glob, math, torch
from safetensors import safe_open
from endor.data.models import resolve_model

def weights(alias, layers=(0, 10)):
    d = resolve_model(alias); out = []
    for f in sorted(glob.glob(f"{d}/*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                if any(f"layers.{l}." in k for l in layers) and k.endswith("proj.weight"):
                    out.append(st.get_tensor(k).float())
    return out

def prune(w):
    k = w.shape[1] // 2
    thr = w.abs().kthvalue(k, dim=1, keepdim=True).values
    return torch.where(w.abs() > thr, w, torch.zeros_like(w))

def rtn_cols(w, bits, G, sym):
    rows, cols = w.shape; per = -(-cols // G)
    p = torch.nn.functional.pad(w, (0, per * G - cols)).view(rows, per, G)
    nz = p != 0
    qmax = 2 ** (bits - 1) - 1
    if sym:
        s = (p.abs().amax(-1, keepdim=True) / qmax).to(torch.bfloat16).float()
        s = torch.where(s == 0, torch.ones_like(s), s)
        q = torch.round(p / s).clamp(-qmax - 1, qmax); d = q * s
    else:
        big = torch.finfo(torch.float32).max
        lo = torch.where(nz, p, torch.full_like(p, big)).amin(-1, keepdim=True)
        hi = torch.where(nz, p, torch.full_like(p, -big)).amax(-1, keepdim=True)
        lo = torch.where(lo == big, 0, lo); hi = torch.where(hi == -big, 0, hi)
        s = ((hi - lo) / (2 ** bits - 1)).to(torch.bfloat16).float(); s = torch.where(s == 0, torch.ones_like(s), s)
        z = lo.to(torch.bfloat16).float()
        q = torch.round((p - z) / s).clamp(0, 2 ** bits - 1); d = q * s + z
    d = torch.where(nz, d, 0).view(rows, -1)[:, :cols]
    return d, rows * per * (32 if not sym else 16)

def rtn_nnz(w, bits, G, sym):
    """groups of G consecutive non-zeros of a row (flattened, per row)"""
    out = torch.zeros_like(w); scalebits = 0
    vals = w[w != 0]
    n = vals.numel(); per = -(-n // G)
    p = torch.nn.functional.pad(vals, (0, per * G - n)).view(per, G)
    qmax = 2 ** (bits - 1) - 1
    if sym:
        s = (p.abs().amax(-1, keepdim=True) / qmax).to(torch.bfloat16).float(); s = torch.where(s == 0, torch.ones_like(s), s)
        d = torch.round(p / s).clamp(-qmax - 1, qmax) * s
    else:
        lo, hi = p.amin(-1, keepdim=True), p.amax(-1, keepdim=True)
        s = ((hi - lo) / (2 ** bits - 1)).to(torch.bfloat16).float(); s = torch.where(s == 0, torch.ones_like(s), s)
        z = lo.to(torch.bfloat16).float()
        d = torch.round((p - z) / s).clamp(0, 2 ** bits - 1) * s + z
    out[w != 0] = d.view(-1)[:n]
    return out, per * (32 if not sym else 16)

for alias in ("smollm2", "gemma3-270m"):
    ws = [prune(w) for w in weights(alias)]
    numel = sum(w.numel() for w in ws)
    ref = sum(float(w.square().sum()) for w in ws)
    for bits in (4, 8):
        for name, fn, G in (("cols sym G128", rtn_cols, 128), ("cols asym G128", rtn_cols, 128), ("cols asym G256", rtn_cols, 256),
                            ("nnz sym G128", rtn_nnz, 128), ("nnz asym G128", rtn_nnz, 128), ("nnz sym G64", rtn_nnz, 64)):
            sym = "asym" not in name
            err = 0.0; sbits = 0
            for w in ws:
                d, sb = fn(w, bits, G, sym); err += float((d - w).square().sum()); sbits += sb
            print(f"{alias:12s} int{bits} {name:16s} rel RMS error {math.sqrt(err / ref):.4f}  scale bits/element {sbits / numel:.4f}")
