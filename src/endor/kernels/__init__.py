"""Fast decompressors, registered into the format's registry (`endor.format.decompress`) on
import, and the fused linear (y = x @ W.T from the compressed W) behind its own small registry.
Importing this compiles nothing and touches no GPU: the CPU extensions are built at install time
and Triton kernels compile on first use."""

from ..format.decompress import Backend, backends, choose, decompress, register
from . import cpu as _cpu  # noqa: F401  registers "cpu"
from . import triton_decompress as _triton  # noqa: F401  registers "triton"
from .fused import choose_linear, linear, linear_backends, register_linear
from .cpu import fused as _cpu_fused  # noqa: F401,E402  registers linear "cpu"
from . import triton_fused as _triton_fused  # noqa: F401,E402  registers linear "triton"

__all__ = ["Backend", "backends", "choose", "choose_linear", "decompress", "linear",
           "linear_backends", "register", "register_linear"]
