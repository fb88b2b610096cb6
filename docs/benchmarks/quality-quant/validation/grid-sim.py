"""Simulate int4 grids in the joint SparseGPT pass; writes raw-valued checkpoints of the rounded
weights. usage: sim.py VARIANT OUTDIR [extra bench args]"""
import sys, torch
from endor.prune import sparsegpt as sg
from endor.convert import pipeline as pl
from endor.format.codecs.quant import groups_per_row
from endor import compress

VARIANT = sys.argv[1]

def nearest(x, c):
    return torch.bucketize(x, (c[1:] + c[:-1]) / 2)

def lloyd(p, nz, dtype, iters=12):
    """p [rows, per, G] float32 -> (scales [rows, per] dtype, levels [16] dtype)"""
    absmax = p.abs().amax(-1, keepdim=True)
    s = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    x = (p / s)[nz]
    c = torch.quantile(x[torch.randperm(x.numel())[:1_000_000]], (torch.arange(16) + 0.5) / 16)
    for _ in range(iters):
        q = nearest(p / s, c)
        ss = (s * s).expand_as(p)[nz]; sp = (s * p)[nz]; qq = q[nz]
        num = torch.zeros(16).index_add_(0, qq, sp); den = torch.zeros(16).index_add_(0, qq, ss)
        c = torch.sort(torch.where(den > 0, num / den.clamp_min(1e-30), c)).values
        best_e = torch.full_like(s, float("inf")); best_s = s.clone()
        for f in torch.linspace(0.85, 1.15, 13):
            s2 = s * f
            d = torch.where(nz, c[nearest(p / s2, c)] * s2, 0)
            e = (d - p).square().sum(-1, keepdim=True)
            b = e < best_e; best_e = torch.where(b, e, best_e); best_s = torch.where(b, s2, best_s)
        s = best_s
    return s.squeeze(-1).to(dtype), c.to(dtype)

def offset_fit(p, nz, dtype):
    """levels +-(o + k) s, k in 0..7, o = t/4: per group (scale, o) by search"""
    absmax = p.abs().amax(-1, keepdim=True)
    best_e = torch.full_like(absmax, float("inf")); best_s = absmax.clone(); best_o = torch.zeros_like(absmax)
    for t in range(16):
        o = t / 4
        for f in torch.linspace(1.0, 0.4, 25):
            s = (absmax * f / (7 + o)).to(dtype).float(); s = torch.where(s == 0, torch.ones_like(s), s)
            d = torch.where(nz, offset_round(p, s, o), 0)
            e = (d - p).square().sum(-1, keepdim=True)
            b = e < best_e
            best_e = torch.where(b, e, best_e); best_s = torch.where(b, s, best_s)
            best_o = torch.where(b, torch.full_like(s, o), best_o)
    return best_s.squeeze(-1).to(dtype), best_o.squeeze(-1)

def offset_round(v, s, o):
    k = torch.round(v.abs() / s - o).clamp(0, 7)
    return torch.where(v < 0, -1.0, 1.0) * (o + k) * s

class SimGrid(sg.JointGrid):
    @classmethod
    def from_weights(cls, w, bits, group_size, dtype, columns=None):
        rows, cols = w.shape
        per = groups_per_row(cols, group_size)
        p = torch.nn.functional.pad(w.to(torch.float32), (0, per * group_size - cols)).view(rows, per, group_size)
        nz = p != 0
        if VARIANT == "codebook":
            scales, levels = lloyd(p, nz, dtype)
            g = cls(scales, bits, group_size, torch.arange(cols) if columns is None else columns)
            g.levels = levels.to(torch.float32)
        else:
            scales, offs = offset_fit(p, nz, dtype)
            g = cls(scales, bits, group_size, torch.arange(cols) if columns is None else columns)
            g.offs = offs
        return g

    def round(self, column, kept):
        self.seen[:, self.columns[column]] = kept
        group = self.groups[column]
        s = self.scales[:, group].to(torch.float32)
        if VARIANT == "codebook":
            v = self.levels[nearest(kept / s, self.levels)] * s
        else:
            v = offset_round(kept, s, self.offs[:, group])
        rounded = torch.where(kept == 0, 0.0, v).to(self.dtype).to(torch.float32)
        self.error_sq += float((kept - rounded).square().sum()); self.kept_sq += float(kept.square().sum())
        return rounded

sg.JointGrid = SimGrid

def _quantize(self, name, t):
    self.scales.pop(name, None)
    et = compress(t, values="raw"); self.nnz[name] = et.nnz
    return et
pl._Conversion._quantize = _quantize

from endor.cli import main
sys.argv = ["endor", "bench", "quality"] + sys.argv[2:]
sys.exit(main())
