"""Fast decompressors, registered into the format's registry (`endor.format.decompress`) on import.
Importing this compiles nothing and touches no GPU: the CPU extension is built at install time and
Triton kernels compile on first use."""

from ..format.decompress import Backend, backends, choose, decompress, register
from . import cpu as _cpu  # noqa: F401  registers "cpu"
from . import triton_decompress as _triton  # noqa: F401  registers "triton"

__all__ = ["Backend", "backends", "choose", "decompress", "register"]
