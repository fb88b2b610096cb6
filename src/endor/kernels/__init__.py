"""Decoders behind one registry. Importing this compiles nothing and touches no GPU: the CPU
extension is built at install time and Triton kernels compile on first use."""

from . import reference
from .registry import Backend, backends, decompress, register

register(Backend("reference", ("cpu", "cuda"), reference.decode, lambda: True, codecs=None))
from . import cpu as _cpu  # noqa: E402,F401  registers "cpu"
from . import triton_decode as _triton  # noqa: E402,F401  registers "triton"

__all__ = ["Backend", "backends", "decompress", "register"]
