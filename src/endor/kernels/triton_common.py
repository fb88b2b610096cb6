"""What the Triton kernels (triton_decompress, triton_exp, triton_quant, triton_fused) share:
whether Triton can run here, a kernel compiled for CUDA or run by Triton's interpreter (CPU
tensors, TRITON_INTERPRET=1: how the kernels are tested without a GPU), and the device a launch
runs on. Triton is imported on first use: it is heavy and optional."""

from __future__ import annotations

import contextlib
import importlib.util
import os

import torch

INTERPRETER_NEEDED = ("the triton backend runs CPU tensors only under Triton's interpreter; set "
                      "TRITON_INTERPRET=1 before starting Python, or use backend='auto'")


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def available() -> bool:
    """True on a CUDA machine with triton, or anywhere with triton and TRITON_INTERPRET=1."""
    if not triton_installed():
        return False
    return interpreter_requested() or torch.cuda.is_available()


def language():
    """triton.language: kernel modules bind it to their global `tl` before building a kernel."""
    import triton.language  # lazy: see the module docstring

    return triton.language


def build(fn, interpret: bool):
    """The Python kernel function `fn` as Triton runs it: interpreted, or JIT-compiled."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction
        return InterpretedFunction(fn)
    from triton.runtime.jit import JITFunction
    return JITFunction(fn)


def require_runnable(device: torch.device) -> None:
    """CPU tensors run only under the interpreter: say how to get it, before launching."""
    if device.type == "cpu" and not interpreter_requested():
        raise RuntimeError(INTERPRETER_NEEDED)


def on_device(device: torch.device):
    """The context a launch on `device` runs in (its CUDA device current; nothing on the CPU)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
