"""The fused CPU linear (linear backend "cpu"): fused.c computes y = x @ W.T from the bitmap and
the values of any codec (raw; exp and int8/int4 decoded a tile at a time into a per-thread
scratch that stays in cache), scalar / AVX2 / AVX-512 chosen at run time (ENDOR_CPU_ISA or
`isa=`, as the decoder), output rows split over threads with the GIL released.

bfloat16 weights with an x that is exactly bfloat16 (a bf16 model's activations) take the
AVX512_BF16 path on CPUs that have it (`bf16_dot`): vdpbf16ps, which treats subnormal inputs
and results as zero (the error bound of kernels/fused.py states the extra term)."""

from __future__ import annotations


import torch

from ...errors import FormatError
from ...format import spec
from ...format.codecs import exp as exp_codec
from ...format.codecs import get_codec
from ...format.codecs.quant import QVALUES, SCALES, grid, groups_per_row
from ...format.tensor import EndorTensor
from . import ISAS, _raise_for, choose_isa, isas_in

try:
    from . import _fused
except ImportError:  # built with optional=True: no compiler, no extension
    _fused = None

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_ERR_MEMORY = 9
_CODEC_CODE = {"raw": 0, "exp": 1, "int8": 2, "int4": 3}
CODECS = tuple(_CODEC_CODE)
CHUNK = 32  # columns per AVX-512 step: x rows are padded to a multiple of it
# Below this many weights per thread, starting a thread costs more than it saves.
MIN_ELEMENTS_PER_THREAD = 1 << 18


def available() -> bool:
    return _fused is not None


def supported_isas() -> tuple[str, ...]:
    return isas_in(_fused.supported()) if _fused is not None else ()


def bf16_dot_supported() -> bool:
    """The avx512 path can multiply bfloat16 pairs (AVX512_BF16 vdpbf16ps)."""
    return _fused is not None and bool(_fused.bf16_dot_supported())


def _choose_isa(isa: str | None) -> int:
    return choose_isa(isa, supported_isas(), "kernel")


def _check_parts(et: EndorTensor) -> None:
    """Sizes, dtypes and devices of every part: the C code trusts them. For int8/int4 also rule
    Q2 (O(1)); rule Q3 (finite scales, O(scales)) is checked when a tensor is loaded, and a
    non-finite scale here only makes outputs non-finite, it never moves a read."""
    n = et.numel
    if et.values_codec not in _CODEC_CODE:
        raise ValueError(f"the fused cpu kernel reads the codecs {CODECS}, not "
                         f"{et.values_codec!r}")
    if et.dtype not in _DTYPE_CODE:
        raise FormatError(f"dtype {et.dtype} is not an Endor dtype ({', '.join(spec.DTYPES)})")
    expected = {
        "bitmap": (et.bitmap, torch.uint8, spec.bitmap_bytes(n)),
        "tiles": (et.tiles, torch.int64, spec.num_tiles(n) + 1),
    }
    if et.values_codec == "raw":
        expected["values"] = (et.values, et.dtype, et.values.numel())
    else:
        codec = get_codec(et.values_codec)
        for suffix, (st_dtype, shape) in codec.parts(et.shape, et.dtype, et.nnz,
                                                     et.codec_params).items():
            dtype = spec.SAFETENSORS_DTYPES[st_dtype]
            expected[suffix] = (et.codec_parts.get(suffix), dtype, shape[0])
    for name, (t, dtype, count) in expected.items():
        if t is None:
            raise FormatError(f"part {name!r} is missing")
        if t.dtype != dtype or t.dim() != 1 or t.numel() != count:
            raise FormatError(f"{name} is {t.dtype}{list(t.shape)}, expected {dtype}[{count}] "
                              f"for a {et.dtype} tensor of shape {list(et.shape)}")
        if t.device.type != "cpu":
            raise ValueError(f"the cpu linear needs {name} on the cpu, not {t.device}")
    if not 0 <= et.nnz <= n:
        raise FormatError(f"values has {et.nnz} elements, outside [0, {n}]")
    if et.values_codec in ("int8", "int4"):
        get_codec(et.values_codec).check_qvalues(et.codec_parts, et.nnz)


def _codec_args(et: EndorTensor) -> tuple[int, tuple, list[torch.Tensor]]:
    """(codec code, the C call's codec_parts tuple, tensors to keep alive during the call)."""
    if et.values_codec == "raw":
        return 0, (), []
    parts = {k: v.contiguous() for k, v in et.codec_parts.items()}
    keep = list(parts.values())
    if et.values_codec == "exp":
        e_bits, m_bits, n_bytes, _ = exp_codec.LAYOUT[et.dtype]
        args = (*(parts[s].data_ptr() for s in (exp_codec.SIGNMANT, exp_codec.CODES,
                                                exp_codec.BASES, exp_codec.ESCIDX,
                                                exp_codec.ESCAPES)),
                parts[exp_codec.ESCAPES].numel(), e_bits, m_bits, n_bytes,
                exp_codec.planes(et.dtype), exp_codec.max_base(et.dtype))
        return 1, args, keep
    group_size = et.codec_params["group_size"]
    _, cols = grid(et.shape)
    args = (parts[QVALUES].data_ptr(), parts[SCALES].data_ptr(), group_size,
            groups_per_row(cols, group_size))
    return _CODEC_CODE[et.values_codec], args, keep


def prepare_x(x: torch.Tensor, dtype: torch.dtype, isa: int, bf16_dot: bool = False,
              natural: bool = False) -> torch.Tensor:
    """x [M, K] float32 -> the layout fused.c reads: rows padded with zeros to a multiple of 32
    columns; with bf16_dot, bfloat16 in natural order; else for bfloat16 on AVX-512 each
    32-column chunk holds its even columns, then its odd ones (the kernel widens bf16 pairs
    without shuffles), unless `natural` (the int4 table-lookup path)."""
    m, k = x.shape
    kp = -(-k // CHUNK) * CHUNK
    padded = torch.zeros(m, kp, dtype=torch.bfloat16 if bf16_dot else torch.float32)
    padded[:, :k] = x
    if dtype == torch.bfloat16 and ISAS[isa] == "avx512" and not bf16_dot and not natural:
        chunks = padded.view(m, kp // CHUNK, CHUNK // 2, 2)
        padded = chunks.transpose(2, 3).contiguous().view(m, kp)
    return padded


def _exactly_bf16(x: torch.Tensor) -> bool:
    return torch.equal(x.to(torch.bfloat16).float(), x)


def matmul(x: torch.Tensor, et: EndorTensor, *, isa: str | None = None,
           threads: int | None = None, bf16_dot: bool | None = None) -> torch.Tensor:
    """x [M, K] float32 contiguous -> float32 [M, N] = x @ W.T, for the raw, exp, int8 and int4
    codecs. `bf16_dot` (bfloat16 weights on avx512): None uses vdpbf16ps when the CPU has it and
    x is exactly bfloat16; False never; True requires it."""
    if _fused is None:
        raise RuntimeError("the fused cpu linear is not built; reinstall endor with a C compiler "
                           "(pip install -e .) or use backend='reference'")
    n, k = et.shape
    _check_parts(et)
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != k or x.device.type != "cpu":
        raise ValueError(f"x must be float32 [M, {k}] on the cpu, got {x.dtype}{list(x.shape)}")
    code = _choose_isa(isa)
    if threads is None:
        threads = max(1, min(torch.get_num_threads(), et.numel // MIN_ELEMENTS_PER_THREAD))
    elif not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    can_dot = et.dtype == torch.bfloat16 and ISAS[code] == "avx512" and bf16_dot_supported()
    if bf16_dot and not can_dot:
        raise ValueError("bf16_dot=True needs bfloat16 weights and the avx512 path on a CPU with "
                         "AVX512_BF16")
    if bf16_dot is None:
        bf16_dot = can_dot and _exactly_bf16(x)
    elif bf16_dot and not _exactly_bf16(x):
        raise ValueError("bf16_dot=True needs an x whose values are exactly bfloat16")
    # fused.c's int4_direct: int4 with groups of whole 32-column chunks on avx512
    int4_direct = et.values_codec == "int4" and ISAS[code] == "avx512" and \
        et.codec_params["group_size"] % CHUNK == 0
    xp = prepare_x(x, et.dtype, code, bf16_dot, natural=int4_direct)
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    bitmap, tiles = et.bitmap.contiguous(), et.tiles.contiguous()
    values = et.values.contiguous() if et.values_codec == "raw" else None
    codec, codec_parts, _keep = _codec_args(et)
    err, tile = _fused.linear(bitmap.data_ptr(), 0 if values is None else values.data_ptr(),
                              et.nnz, tiles.data_ptr(), xp.data_ptr(), y.data_ptr(), n, k,
                              x.shape[0], xp.shape[1], _DTYPE_CODE[et.dtype], code, threads,
                              int(bf16_dot), codec, codec_parts)
    if err == _ERR_MEMORY:
        raise MemoryError("the fused cpu linear could not allocate its per-thread scratch")
    if err:
        _raise_for(err, tile, et)
    return y


def _register() -> None:
    from ..fused import LinearBackend, register_linear
    register_linear(LinearBackend("cpu", ("cpu",), matmul, available, codecs=CODECS))


_register()

__all__ = ["CODECS", "FormatError", "available", "bf16_dot_supported", "matmul", "prepare_x",
           "supported_isas"]
