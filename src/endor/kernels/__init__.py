"""Decoders behind one registry. Importing this compiles nothing and touches no GPU: the CPU
extension is built at install time and Triton kernels compile on first use."""

from . import reference
from .registry import Backend, backends, decompress, register

register(Backend("reference", ("cpu", "cuda"), reference.decode, lambda: True))
from . import cpu as _cpu  # noqa: E402,F401  registers "cpu"
from . import triton_decode as _triton  # noqa: E402,F401  registers "triton"
from .fused import choose_linear, linear, linear_backends, register_linear  # noqa: E402
from .cpu import fused as _cpu_fused  # noqa: E402,F401  registers linear "cpu"
from . import triton_fused as _triton_fused  # noqa: E402,F401  registers linear "triton"

__all__ = ["Backend", "backends", "choose_linear", "decompress", "linear", "linear_backends",
           "register", "register_linear"]
