"""The decompressor contract: one small registry of decompressors; `decompress` picks one, so
callers never branch on the device. The format owns it with its reference decompressor;
`endor.kernels` registers the fast backends (CPU C extension, Triton) into it when imported
(`import endor` does that)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import reference
from .tensor import EndorTensor


@dataclass(frozen=True)
class Backend:
    name: str
    device_types: tuple[str, ...]
    decompress: Callable[[EndorTensor, torch.Tensor], None]  # (et on device, flat out) -> None
    available: Callable[[], bool]
    codecs: tuple[str, ...] | None = ("raw",)  # value codecs it decodes; None: every codec

    def handles(self, codec: str) -> bool:
        return self.codecs is None or codec in self.codecs


_BACKENDS: dict[str, Backend] = {}
_AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")}


def register(backend: Backend) -> None:
    _BACKENDS[backend.name] = backend


def backends() -> dict[str, Backend]:
    return dict(_BACKENDS)


def choose(backend: str, device: torch.device, codec: str = "raw") -> Backend:
    """The backend for `backend` on `device`; "auto" (and a named backend that does not
    decode `codec`) falls back to the reference decoder, which decodes every codec."""
    if backend == "auto":
        for name in _AUTO_ORDER.get(device.type, ("reference",)):
            b = _BACKENDS.get(name)
            if b is not None and b.available() and b.handles(codec):
                return b
        return _BACKENDS["reference"]
    b = _BACKENDS.get(backend)
    if b is None:
        raise ValueError(f"unknown backend {backend!r}; choose one of "
                         f"{['auto', *sorted(_BACKENDS)]}")
    if device.type not in b.device_types:
        raise ValueError(f"backend {backend!r} runs on {', '.join(b.device_types)}, not on "
                         f"{device.type}")
    if not b.available():
        raise ValueError(f"backend {backend!r} is not available here ({b.name} needs its "
                         "compiled extension / triton); use backend='auto'")
    return b if b.handles(codec) else _BACKENDS["reference"]


def decompress(et: EndorTensor, *, device=None, out: torch.Tensor | None = None,
               backend: str = "auto") -> torch.Tensor:
    """Rebuild the dense tensor, bit-exact. `out` (optional) is a preallocated buffer of the
    same dtype and number of elements on the target device; it is returned, reshaped."""
    if not isinstance(et, EndorTensor):
        raise TypeError(f"endor.decompress takes an EndorTensor, got {type(et).__name__}")
    device = torch.device(device) if device is not None else et.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if out is not None:
        if out.dtype != et.dtype or out.numel() != et.numel or out.device != device:
            raise ValueError(f"out is {out.dtype}[{out.numel()}] on {out.device}; expected "
                             f"{et.dtype}[{et.numel}] on {device}")
        if not out.is_contiguous():
            raise ValueError("out must be contiguous")
    chosen = choose(backend, device, et.values_codec)
    et = et.to(device, non_blocking=True)
    if out is None:
        out = torch.empty(et.numel, dtype=et.dtype, device=device)
    if et.numel:
        chosen.decompress(et, out.view(-1))
    return out.view(et.shape)


register(Backend("reference", ("cpu", "cuda"), reference.decompress, lambda: True, codecs=None))
