"""The fused CPU linear (linear backend "cpu"): fused.c computes y = x @ W.T from the bitmap and
packed values, scalar / AVX2 / AVX-512 chosen at run time (ENDOR_CPU_ISA or `isa=`, as the
decoder), output rows split over threads with the GIL released."""

from __future__ import annotations


import torch

from ...errors import FormatError
from ...format import spec
from ...format.tensor import EndorTensor
from . import ISAS, _raise_for, choose_isa, isas_in

try:
    from . import _fused
except ImportError:  # built with optional=True: no compiler, no extension
    _fused = None

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ERR_MEMORY = 5
CHUNK = 32  # columns per AVX-512 step: x rows are padded to a multiple of it
# Below this many weights per thread, starting a thread costs more than it saves.
MIN_ELEMENTS_PER_THREAD = 1 << 18


def available() -> bool:
    return _fused is not None


def supported_isas() -> tuple[str, ...]:
    return isas_in(_fused.supported()) if _fused is not None else ()


def _choose_isa(isa: str | None) -> int:
    return choose_isa(isa, supported_isas(), "kernel")


def _check_parts(et: EndorTensor) -> None:
    """Sizes, dtypes and devices of every part: the C code trusts them."""
    n = et.numel
    expected = {
        "bitmap": (et.bitmap, torch.uint8, spec.bitmap_bytes(n)),
        "values": (et.values, et.dtype, et.values.numel()),
        "tiles": (et.tiles, torch.int64, spec.num_tiles(n) + 1),
    }
    for name, (t, dtype, count) in expected.items():
        if t.dtype != dtype or t.dim() != 1 or t.numel() != count:
            raise FormatError(f"{name} is {t.dtype}{list(t.shape)}, expected {dtype}[{count}] "
                              f"for a {et.dtype} tensor of shape {list(et.shape)}")
        if t.device.type != "cpu":
            raise ValueError(f"the cpu linear needs {name} on the cpu, not {t.device}")
    if et.nnz > n:
        raise FormatError(f"values has {et.nnz} elements, more than the tensor's {n}")
    if et.dtype not in _DTYPE_CODE:
        raise FormatError(f"dtype {et.dtype} is not an Endor dtype ({', '.join(spec.DTYPES)})")


def prepare_x(x: torch.Tensor, dtype: torch.dtype, isa: int) -> torch.Tensor:
    """x [M, K] float32 -> the layout fused.c reads: rows padded with zeros to a multiple of 32
    columns; for bfloat16 on AVX-512 each 32-column chunk holds its even columns, then its odd
    ones (the kernel widens bf16 pairs without shuffles)."""
    m, k = x.shape
    kp = -(-k // CHUNK) * CHUNK
    padded = torch.zeros(m, kp, dtype=torch.float32)
    padded[:, :k] = x
    if dtype == torch.bfloat16 and ISAS[isa] == "avx512":
        chunks = padded.view(m, kp // CHUNK, CHUNK // 2, 2)
        padded = chunks.transpose(2, 3).contiguous().view(m, kp)
    return padded


def matmul(x: torch.Tensor, et: EndorTensor, *, isa: str | None = None,
           threads: int | None = None) -> torch.Tensor:
    """x [M, K] float32 contiguous -> float32 [M, N] = x @ W.T."""
    if _fused is None:
        raise RuntimeError("the fused cpu linear is not built; reinstall endor with a C compiler "
                           "(pip install -e .) or use backend='reference'")
    n, k = et.shape
    if et.values_codec != "raw":
        raise ValueError(f"the fused cpu kernel reads raw values, not the {et.values_codec!r} "
                         "codec; use endor.kernels.linear (it decompresses those)")
    _check_parts(et)
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != k or x.device.type != "cpu":
        raise ValueError(f"x must be float32 [M, {k}] on the cpu, got {x.dtype}{list(x.shape)}")
    code = _choose_isa(isa)
    if threads is None:
        threads = max(1, min(torch.get_num_threads(), et.numel // MIN_ELEMENTS_PER_THREAD))
    elif not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    xp = prepare_x(x, et.dtype, code)
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    bitmap, values, tiles = (t.contiguous() for t in (et.bitmap, et.values, et.tiles))
    err, tile = _fused.linear(bitmap.data_ptr(), values.data_ptr(), values.numel(),
                              tiles.data_ptr(), xp.data_ptr(), y.data_ptr(), n, k, x.shape[0],
                              xp.shape[1], _DTYPE_CODE[et.dtype], code, threads)
    if err == _ERR_MEMORY:
        raise MemoryError("the fused cpu linear could not allocate its per-thread scratch")
    if err:
        _raise_for(err, tile, et)
    return y


def _register() -> None:
    from ..fused import LinearBackend, register_linear
    register_linear(LinearBackend("cpu", ("cpu",), matmul, available))


_register()

__all__ = ["FormatError", "available", "matmul", "prepare_x", "supported_isas"]
