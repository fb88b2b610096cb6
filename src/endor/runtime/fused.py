"""Compute from the compressed form: decoder-layer Linear weights stay Endor tensors, resident
(in the budget at their compressed size) or streamed (views of the shard's read buffer, no dense
slot), and `EndorLinear` computes y = x @ W.T + b with the fused kernel (endor.kernels.linear)
for a few rows of x (decode), or decompresses into a temporary and runs a GEMM for many (prefill,
large batches: FUSED_MAX_ROWS, per weight dtype and value codec).

Not bit-identical to the dense model: the fused kernel sums in float32 in its own order (the bound
is in kernels/fused.py), where torch's GEMV sums in another. Greedy tokens match on the test
models (tests/runtime/test_fused.py); they may differ where two logits are within that error."""

from __future__ import annotations

import threading

import torch
from torch import nn

from ..format import EndorFile, EndorTensor
from ..kernels import choose_linear, decompress, linear
from .plan import LayerPlan
from .weights import set_tensor

COMPUTE = ("auto", "fused", "dense")
# At most this many rows of x (tokens x batch) go through the fused kernel, per (weight dtype,
# value codec); more decompress into a reused scratch and run a GEMM. The weights are held
# compressed either way, so fused vs decompress + GEMM is the comparison that sets the switch.
# The fused kernel passes over W once per 8 rows of x (kernels/cpu/fused.c MAX_BLOCK): its cost
# steps up past each multiple of 8, while decompress + GEMM decodes W once for any batch and
# torch's bf16 GEMM is fast here, its fp16 one slow (no fp16 FMA: 14x the bf16 time at 16 rows).
# Measured with `endor bench gemv --threads 1 --dtypes bf16,fp16,fp32 --values raw,exp,int4,int8
# --batches 1,2,4,8,12,16,32 --repeat 5` (docs/benchmarks/gemv/crossover), 4096x14336 at 50%,
# AVX-512 + AVX512_BF16, one thread: what a streamed model computes with on our 2 cores (the
# other reads and checks). Load 2.8 -> 11.8. Decompress + GEMM time / fused time at the limit,
# then at the next batch measured:
#   bf16  raw 1.11 (16), 0.72 (32);  exp 1.14 (8), 0.81 (12);  int8 1.09 (8), 0.69 (12)
#   fp16  every codec >= 1.26 up to 32 (the largest measured: 32 is a floor, not a crossover)
#   fp32  raw 1.02 (32, the largest measured);  exp 1.43 (8), 0.64 (12);  int8 1.19 (8),
#         0.94 (12)
# int4 re-measured after its register-table kernel (1ef68e6), the same command with --values
# int4 (docs/benchmarks/gemv/crossover-int4, load 6.8): bf16 1.15 (12), 0.93 (16); fp16 2.03
# (32); fp32 1.30 (32), each the largest measured.
# Two threads move the bf16 switch earlier (an earlier run: 0.85x at 16 rows, raw), and the
# AVX2 path is unmeasured: same table. To re-measure after a kernel change, run that command
# (--out a fresh folder) and copy its "fused_max_rows" (the last batch before decompress + GEMM
# first wins) here.
FUSED_MAX_ROWS = {
    (torch.bfloat16, "raw"): 16, (torch.bfloat16, "exp"): 8, (torch.bfloat16, "int4"): 12,
    (torch.bfloat16, "int8"): 8,
    (torch.float16, "raw"): 32, (torch.float16, "exp"): 32, (torch.float16, "int4"): 32,
    (torch.float16, "int8"): 32,
    (torch.float32, "raw"): 32, (torch.float32, "exp"): 8, (torch.float32, "int4"): 32,
    (torch.float32, "int8"): 8,
}
DEFAULT_MAX_ROWS = 8  # a dtype or codec not in the table: one pass of the kernel


def max_fused_rows(dtype: torch.dtype, codec: str) -> int:
    """Rows of x up to which the fused kernel computes a weight of this dtype and codec."""
    return FUSED_MAX_ROWS.get((dtype, codec), DEFAULT_MAX_ROWS)


def resolve_compute(compute: str, device: torch.device, weights: str) -> str:
    """"fused", "dense", or "auto": fused for each decoder layer whose compressed Linear weights
    are all in a codec the fused kernel reads straight from the compressed bytes (fused_codecs),
    dense for the others (layer_names decides). Why, measured on the e2e model (1.15 GB bf16,
    50%, disk, cold, 10% budget; 2 shared cores, docs/benchmarks/e2e-values): streamed raw
    values computed fused ran faster than decompressed (the fused kernel reads 0.61 GB per token
    where decompress + GEMV writes and reads 1.08 GB more), while a codec the kernel cannot read
    (exp, int4 until their kernels land) would be decompressed per matrix on the compute
    thread, which the dense pipeline does on the loader thread beside the reads. On CUDA
    nothing is measured yet: auto is dense there."""
    if compute not in COMPUTE:
        raise ValueError(f"compute must be one of {COMPUTE}, got {compute!r}")
    if compute == "fused":
        choose_linear("auto", device)
        return "fused"
    if compute == "auto" and weights == "endor" and device.type == "cpu" and \
            choose_linear("auto", device).name != "reference":
        return "auto"
    return "dense"


def layer_names(layer: nn.Module, plan: LayerPlan, compute: str,
                device: torch.device) -> frozenset[str]:
    """The weights of `layer` to keep compressed under `compute` (resolve_compute's answer):
    every fusable one with "fused"; with "auto" the same if the kernel reads all their codecs,
    none otherwise."""
    if compute == "dense":
        return frozenset()
    names = fusable(layer, plan)
    if compute == "auto":
        codecs = {tp.entry.codec for tp in plan.tensors if tp.name in names}
        if not codecs <= set(fused_codecs(device)):
            return frozenset()
    return names


def fused_codecs(device: torch.device) -> tuple[str, ...]:
    """The value codecs the chosen fused kernel reads straight from the compressed bytes;
    others are decompressed (into a reused scratch) and multiplied dense."""
    return tuple(getattr(choose_linear("auto", device), "codecs", ("raw",)))


_scratch = threading.local()  # per thread: (device, dtype) -> the largest dense weight so far


def dense_scratch(et: EndorTensor) -> torch.Tensor:
    """A dense buffer for `et`, reused across layers and tokens (compute runs one Linear at a
    time per thread): no allocation per call, and the pages stay warm in the cache."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    key = (et.device, et.dtype)
    buf = buffers.get(key)
    if buf is None or buf.numel() < et.numel:
        buf = buffers[key] = torch.empty(et.numel, dtype=et.dtype, device=et.device)
    return buf[:et.numel]


class EndorLinear(nn.Module):
    """nn.Linear whose weight is an Endor tensor (`et`, None between uses of a streamed layer)."""

    def __init__(self, linear_module: nn.Linear, *, max_fused_rows: int | None = None,
                 backend: str = "auto"):
        super().__init__()
        self.in_features = linear_module.in_features
        self.out_features = linear_module.out_features
        self.bias = linear_module.bias
        self.et: EndorTensor | None = None
        self.max_fused_rows = max_fused_rows  # None: FUSED_MAX_ROWS for the weight's kind
        self.backend = backend  # the decoder for the GEMM path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        et = self.et
        if et is None:
            raise RuntimeError("EndorLinear has no weight (a streamed layer outside its forward)")
        rows = x.numel() // max(x.shape[-1], 1)
        bias = self.bias
        limit = self.max_fused_rows
        if limit is None:
            limit = max_fused_rows(et.dtype, et.values_codec)
        if rows <= limit and et.values_codec in fused_codecs(x.device):
            return linear(x, et, bias)
        weight = decompress(et, out=dense_scratch(et), backend=self.backend).view(et.shape)
        return nn.functional.linear(x, weight.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, fused up to "
                f"{self.max_fused_rows or 'FUSED_MAX_ROWS'} rows")


def fusable(layer: nn.Module, plan: LayerPlan) -> frozenset[str]:
    """Relative names of the layer's compressed weights that belong to an nn.Linear."""
    names = set()
    for tp in plan.tensors:
        module_path, _, leaf = tp.name.rpartition(".")
        if tp.compressed and leaf == "weight" and len(tp.shape) == 2 and isinstance(
                layer.get_submodule(module_path) if module_path else layer, nn.Linear):
            names.add(tp.name)
    return frozenset(names)


def install(layer: nn.Module, names: frozenset[str], *, backend: str) -> None:
    """Replace the nn.Linear of each weight name by an EndorLinear (weight unset)."""
    for name in names:
        module_path = name.rpartition(".")[0]
        parent_path, _, child = module_path.rpartition(".")
        parent = layer.get_submodule(parent_path) if parent_path else layer
        setattr(parent, child, EndorLinear(getattr(parent, child), backend=backend))


def set_weight(layer: nn.Module, name: str, value) -> None:
    """set_tensor, or the Endor weight of an EndorLinear."""
    if isinstance(value, EndorTensor) or value is None and name.endswith(".weight") and \
            isinstance(layer.get_submodule(name.rpartition(".")[0]), EndorLinear):
        layer.get_submodule(name.rpartition(".")[0]).et = value
    else:
        set_tensor(layer, name, value)


def resident_bytes(plan: LayerPlan, names: frozenset[str]) -> int:
    """What the layer holds resident: its fused weights at their stored (compressed) size."""
    return sum(sum(p.end - p.start for p in tp.parts) if tp.name in names else tp.nbytes
               for tp in plan.tensors)


def load_resident(layer: nn.Module, f: EndorFile, plan: LayerPlan, prefix: str,
                  names: frozenset[str], *, device, backend: str) -> None:
    """A resident layer: fused weights compressed on `device`, the rest dense."""
    from .weights import load_dense
    for tp in plan.tensors:
        if tp.name in names:
            set_weight(layer, tp.name, f.get_compressed(prefix + tp.name).to(device))
        else:
            set_tensor(layer, tp.name, load_dense(f, prefix + tp.name, tp.dtype, device=device,
                                                  backend=backend))
