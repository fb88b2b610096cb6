"""`linear(x, et, bias)`: y = x @ W.T + bias with W an Endor tensor, computed from its bitmap and
packed values. Backends (reference, cpu, triton) sit behind one small registry, as decoders do.

Accuracy contract (every backend, tested in tests/kernels/test_fused.py). Products are exact in
float32 (x and W widened exactly) and summed in float32 in a backend-specific order, then the bias
is added in float32 and the result rounded once to x's dtype. With u32 = 2**-24 and u the unit
roundoff of the output dtype (2**-8 bfloat16, 2**-11 float16, 2**-24 float32), for every output:

    |y - exact| <= (K + 1) * u32 * (sum_k |x_k w_k| + |b|) * (1 + u) + u * |exact|

where `exact` is the real-number result and K the number of columns (the classic bound for a
recursive or blocked float32 sum, plus one rounding). torch's dense GEMV obeys the same bound,
so the two may differ by up to twice it; they are not bit-identical in general.

One more term where float32 subnormals meet: the CPU kernel's bfloat16 path for an x that is
exactly bfloat16 (vdpbf16ps, AVX512_BF16) treats subnormal inputs and results as zero, so the
bound adds sum |x_k w_k| over the terms with a subnormal factor (|.| < 2**-126) and K * 2**-126
for flushed partial sums; both are zero unless such tiny values occur.

W's values are the decoded ones for every codec: `exp` decodes exactly; `int8`/`int4` weights
are round_D(scale * q) (FORMAT.md 1.6), and the kernels multiply exactly those values, so the
bound holds against the dequantized weight (the quantization error is the codec's, not this
kernel's)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..format import spec
from ..format.decompress import decompress
from ..format.tensor import EndorTensor

# Unit roundoff of each output dtype (half an ulp at 1.0).
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


@dataclass(frozen=True)
class LinearBackend:
    name: str
    device_types: tuple[str, ...]
    # (x2d float32 [M, K] contiguous, et) -> float32 [M, N]
    matmul: Callable[[torch.Tensor, EndorTensor], torch.Tensor]
    available: Callable[[], bool]
    codecs: tuple[str, ...] = ("raw",)  # value codecs it reads; linear() decompresses others


_BACKENDS: dict[str, LinearBackend] = {}
_AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")}


def register_linear(backend: LinearBackend) -> None:
    _BACKENDS[backend.name] = backend


def linear_backends() -> dict[str, LinearBackend]:
    return dict(_BACKENDS)


def choose_linear(backend: str, device: torch.device) -> LinearBackend:
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("reference",)):
            b = _BACKENDS.get(name)
            if b is not None and b.available():
                return b
        return _BACKENDS["reference"]
    b = _BACKENDS.get(backend)
    if b is None:
        raise ValueError(f"unknown linear backend {backend!r}; choose one of "
                         f"{['auto', *sorted(_BACKENDS)]}")
    if device.type not in b.device_types:
        raise ValueError(f"linear backend {backend!r} runs on {', '.join(b.device_types)}, not "
                         f"on {device.type}")
    if not b.available():
        raise RuntimeError(f"linear backend {backend!r} is not available here (it needs its "
                           "compiled extension / triton); use backend='auto'")
    return b


def error_bound(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                exact: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The bound of the module docstring, per output, from the dense weight (for tests)."""
    k = weight.shape[-1]
    magnitude = x.double().abs() @ weight.double().abs().T
    if bias is not None:
        magnitude = magnitude + bias.double().abs()
    u = UNIT_ROUNDOFF[out_dtype]
    tiny = 2.0**-126
    xd, wd = x.double(), weight.double()
    x_sub = torch.where(xd.abs() < tiny, xd.abs(), 0.0)
    w_sub = torch.where(wd.abs() < tiny, wd.abs(), 0.0)
    flushed = x_sub @ wd.abs().T + xd.abs() @ w_sub.T + k * tiny
    return (k + 1) * 2.0**-24 * magnitude * (1 + u) + u * exact.abs() + flushed


def _check(x: torch.Tensor, et: EndorTensor, bias: torch.Tensor | None) -> None:
    if not isinstance(et, EndorTensor):
        raise TypeError(f"linear takes an EndorTensor weight, got {type(et).__name__}")
    if len(et.shape) != 2:
        raise ValueError(f"linear needs a 2-D weight [out, in], got shape {list(et.shape)}")
    if not isinstance(x, torch.Tensor) or x.dtype not in spec.INT_VIEW:
        raise ValueError(f"x must be a float32/float16/bfloat16 tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 1 or x.shape[-1] != et.shape[1]:
        raise ValueError(f"x has shape {list(x.shape)}; its last dimension must be the weight's "
                         f"{et.shape[1]} input features")
    if x.device != et.device:
        raise ValueError(f"x is on {x.device}, the weight on {et.device}")
    if bias is not None and (bias.shape != (et.shape[0],) or bias.device != x.device):
        raise ValueError(f"bias must have shape [{et.shape[0]}] on {x.device}, got "
                         f"{list(bias.shape)} on {bias.device}")


def linear(x: torch.Tensor, et: EndorTensor, bias: torch.Tensor | None = None, *,
           backend: str = "auto") -> torch.Tensor:
    """y = x @ W.T (+ bias) for x [..., K] and the Endor weight W [N, K], without the dense W.
    float32 accumulation; the result has x's dtype (see the module docstring for the error
    bound). Meant for a few rows of x (decode); for many, decompress + GEMM is faster."""
    _check(x, et, bias)
    chosen = choose_linear(backend, x.device)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
    if et.values_codec not in chosen.codecs:
        # A backend without a tile decoder for this codec: decompress, then a GEMM.
        y = x2 @ decompress(et).view(et.shape).float().T
    else:
        y = chosen.matmul(x2, et)
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).reshape(*lead, et.shape[0])


def reference_matmul(x: torch.Tensor, et: EndorTensor) -> torch.Tensor:
    """The obviously correct one: decompress with the reference decoder, float32 matmul."""
    dense = decompress(et, backend="reference")
    return x @ dense.view(et.shape).float().T


register_linear(LinearBackend("reference", ("cpu", "cuda"), reference_matmul, lambda: True,
                              codecs=("raw", "exp", "int8", "int4")))
