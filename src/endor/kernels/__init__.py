"""Decoders behind one registry. Importing this compiles nothing and touches no GPU: the CPU
extension is built at install time and Triton kernels compile on first use."""

from . import reference
from .registry import Backend, backends, decompress, register

register(Backend("reference", ("cpu", "cuda"), reference.decode, lambda: True))

__all__ = ["Backend", "backends", "decompress", "register"]
