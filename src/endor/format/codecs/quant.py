"""The `int8` and `int4` value codecs (docs/FORMAT.md, section 1.6): lossy, opt-in.

Each row of the tensor's 2-D view (rows = numel / shape[-1], cols = shape[-1]) is cut into
groups of G consecutive input columns; a group has one scale `s` in the tensor's dtype and each
non-zero element of it one signed integer `q` (int8: -128..127, int4: -8..7). The decoded value
is fl_D(fl32(s) * q): the product in float32 (exact for float16/bfloat16 scales), rounded once,
to nearest even, to the tensor's dtype. A scale belongs to a position, not to a run of values,
so every tile still decodes alone, and a fused kernel finds the scale of a weight from its row
and column the way GPTQ's group-wise kernels do.

The encoder is round-to-nearest with symmetric scales s = absmax(group) / qmax; an element that
quantizes to 0 becomes a zero of the bitmap (it decodes to +0.0 either way and costs nothing).
SparseGPT's joint quantization (prune/sparsegpt.py) passes its own scales instead."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...errors import FormatError
from .. import spec
from . import ValueCodec, register_codec

QVALUES, SCALES = "qvalues", "scales"
DEFAULT_GROUP_SIZE = 128
MAX_GROUP_SIZE = 1 << 24


def grid(shape) -> tuple[int, int]:
    """(rows, cols) of the 2-D view groups are cut from: the last dimension is the columns (a
    rank-0 tensor is one row of one column)."""
    cols = int(shape[-1]) if len(shape) else 1
    numel = math.prod(shape)
    return (numel // cols if cols else 0), cols


def groups_per_row(cols: int, group_size: int) -> int:
    return -(-cols // group_size)


def num_scales(shape, group_size: int) -> int:
    rows, cols = grid(shape)
    return rows * groups_per_row(cols, group_size)


def group_index(flat_index: torch.Tensor, shape, group_size: int) -> torch.Tensor:
    """The scale index of each element index (int64): row * groups_per_row + column // G."""
    _, cols = grid(shape)
    rows_i = torch.div(flat_index, cols, rounding_mode="floor")
    return rows_i * groups_per_row(cols, group_size) + (flat_index - rows_i * cols) // group_size


def check_group_size(group_size) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) \
            or not 1 <= group_size <= MAX_GROUP_SIZE:
        raise ValueError(f"group_size must be an integer in [1, {MAX_GROUP_SIZE}], got "
                         f"{group_size!r}")
    return group_size


# NaN and infinity have every exponent bit set. On the CPU numpy tests the bits without torch's
# thread pool (torch.isfinite took 0.2 s for 131k scales on our loaded 2-core machine).
_EXPONENT = {torch.float32: (torch.int32, 0x7F800000), torch.float16: (torch.int16, 0x7C00),
             torch.bfloat16: (torch.int16, 0x7F80)}


def _all_finite(t: torch.Tensor) -> bool:
    if t.device.type != "cpu" or t.dtype not in _EXPONENT:
        return bool(torch.isfinite(t).all())
    int_dtype, exponent = _EXPONENT[t.dtype]
    bits = t.detach().contiguous().view(int_dtype).numpy()
    return not bool(((bits & exponent) == exponent).any())


@dataclass(frozen=True)
class Quantized:
    """A tensor on a codec's grid: `dequantized` is what the decoder returns (dtype D, the input's
    shape), `q` the integers (int8, same shape, 0 where dequantized is +0.0), `scales` D [rows,
    groups_per_row]."""
    dequantized: torch.Tensor
    q: torch.Tensor
    scales: torch.Tensor


def dequantize(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The format's definition, elementwise: fl_D(fl32(scale) * q) (q, scales broadcast)."""
    return (scales.to(torch.float32) * q.to(torch.float32)).to(dtype)


def symmetric_scales(w: torch.Tensor, qmax: int, dtype: torch.dtype) -> torch.Tensor:
    """absmax / qmax in float32, rounded to `dtype`; w: [..., G] (zeros padded). A group whose
    absmax/qmax underflows to 0 gets its absmax as scale, so nothing non-zero vanishes."""
    absmax = w.abs().amax(dim=-1).to(torch.float32)
    scales = (absmax / qmax).to(dtype)
    return torch.where((scales == 0) & (absmax > 0), absmax.to(dtype), scales)


def mse_scales(w: torch.Tensor, qmax: int, dtype: torch.dtype, *, steps: int = 25,
               min_fraction: float = 0.4) -> torch.Tensor:
    """Per group, the scale among absmax/qmax x (1, ..., min_fraction) (`steps` + 1 candidates,
    each rounded to `dtype`) whose round-to-nearest grid gives the group the least squared error:
    clipping the largest weights a little buys every other weight a finer grid (GPTQ's `mse`
    option). w: [..., G] float32 (zeros padded; a zero costs nothing on any grid)."""
    absmax = symmetric_scales(w, qmax, dtype)
    best, best_error = absmax, None
    for k in range(steps + 1):
        fraction = 1.0 - (1.0 - min_fraction) * k / steps
        scales = (absmax.to(torch.float32) * fraction).to(dtype)
        scales = torch.where((scales == 0) & (absmax != 0), absmax, scales)
        s32 = scales.to(torch.float32).unsqueeze(-1)
        safe = torch.where(s32 == 0, torch.ones_like(s32), s32)
        q = torch.where(s32 == 0, 0.0, torch.round(w / safe)).clamp_(-qmax - 1, qmax)
        error = (dequantize(q, s32, dtype).to(torch.float32) - w).square_().sum(dim=-1)
        if best_error is None:
            best_error = error
            continue
        better = error < best_error
        best = torch.where(better, scales, best)
        best_error = torch.where(better, error, best_error)
    return best


def quantize(tensor: torch.Tensor, bits: int, group_size: int = DEFAULT_GROUP_SIZE,
             scales: torch.Tensor | None = None) -> Quantized:
    """Round-to-nearest (ties to even) onto the int`bits` grid of groups of `group_size` input
    columns; `scales` [rows, groups_per_row] (the tensor's dtype) overrides the symmetric
    absmax scales. Zeros stay zeros."""
    dtype = tensor.dtype
    group_size = check_group_size(group_size)
    if dtype not in spec.INT_VIEW:
        raise ValueError(f"int{bits} quantizes {', '.join(spec.DTYPES)} tensors, not {dtype}")
    rows, cols = grid(tensor.shape)
    per_row = groups_per_row(cols, group_size)
    w = tensor.detach().reshape(rows, cols).to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"int{bits} cannot quantize NaN or infinity (keep such a tensor raw)")
    padded = torch.nn.functional.pad(w, (0, per_row * group_size - cols))
    padded = padded.view(rows, per_row, group_size)
    qmax = (1 << (bits - 1)) - 1
    if scales is None:
        scales = symmetric_scales(padded, qmax, dtype)
    elif scales.shape != (rows, per_row) or scales.dtype != dtype:
        raise ValueError(f"scales are {scales.dtype}{list(scales.shape)}, expected "
                         f"{dtype}[{rows}, {per_row}]")
    s32 = scales.to(torch.float32).unsqueeze(-1)
    safe = torch.where(s32 == 0, torch.ones_like(s32), s32)
    q = torch.where(s32 == 0, 0.0, torch.round(padded / safe)).clamp_(-qmax - 1, qmax)
    q = q.to(torch.int8)
    deq = dequantize(q, scales.unsqueeze(-1), dtype).masked_fill_(q == 0, 0)  # never -0.0
    q = q.view(rows, per_row * group_size)[:, :cols]
    deq = deq.view(rows, per_row * group_size)[:, :cols]
    return Quantized(deq.reshape(tensor.shape), q.reshape(tensor.shape), scales)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [n] in -8..7 -> uint8 [ceil(n/2)]: value j in byte j//2, low nibble first, two's
    complement; the unused high nibble of an odd count is 0."""
    nibbles = (q.to(torch.int16) & 0xF).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_zeros(1)])
    pairs = nibbles.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_int4(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 [ceil(n/2)] -> int8 [n] (sign-extended nibbles)."""
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=1).view(-1)[:n].to(torch.int16)
    return ((nibbles ^ 8) - 8).to(torch.int8)


class QuantCodec(ValueCodec):
    """int8 / int4: scales per group of G input columns, one integer per non-zero."""

    dtypes = tuple(spec.DTYPES.values())
    positional = True  # decode_values needs each value's element position

    def __init__(self, bits: int):
        self.bits = bits
        self.name = f"int{bits}"
        self.qmax = (1 << (bits - 1)) - 1

    def check_params(self, params, dtype):
        if set(params) != {"group_size"}:
            raise FormatError(f"the {self.name} codec takes exactly 'group_size', got "
                              f"{sorted(params)}")
        try:
            return {"group_size": check_group_size(params["group_size"])}
        except ValueError as e:
            raise FormatError(str(e)) from None

    def qvalues_part(self, nnz: int) -> tuple[str, list[int]]:
        return ("I8", [nnz]) if self.bits == 8 else ("U8", [-(-nnz // 2)])

    def parts(self, shape, dtype, nnz, params):
        return {QVALUES: self.qvalues_part(nnz),
                SCALES: (spec.SAFETENSORS_NAMES[dtype], [num_scales(shape, params["group_size"])])}

    def prepare(self, tensor: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE,
                scales: torch.Tensor | None = None):
        """The tensor the bitmap is built from (the dequantized one) and encode's options."""
        quantized = quantize(tensor, self.bits, group_size, scales)
        return quantized.dequantized, {"quantized": quantized, "group_size": group_size}

    def encode(self, values, tiles, *, quantized: Quantized | None = None,
               group_size: int = DEFAULT_GROUP_SIZE):
        if quantized is None:
            raise ValueError(f"the {self.name} codec encodes through endor.compress (it needs "
                             "element positions)")
        q = quantized.q.reshape(-1)
        q = q[q != 0]
        assert q.numel() == values.numel(), "dequantized non-zeros and q != 0 disagree"
        stored = q.contiguous() if self.bits == 8 else pack_int4(q)
        return ({"group_size": group_size},
                {QVALUES: stored, SCALES: quantized.scales.reshape(-1).contiguous()})

    def check_qvalues(self, parts, nnz: int) -> torch.Tensor:
        """The stored integers part, its dtype, shape and (int4) rule Q2 checked: O(1)."""
        stored = parts[QVALUES]
        st_dtype, (count,) = self.qvalues_part(nnz)
        want = torch.int8 if st_dtype == "I8" else torch.uint8
        if stored.dtype != want or stored.dim() != 1 or stored.numel() != count:
            raise FormatError(f"qvalues is {stored.dtype}{list(stored.shape)}, expected "
                              f"{want}[{count}]")
        if self.bits == 4 and nnz % 2 and int(stored[-1]) >> 4:
            raise FormatError("int4 qvalues: the unused high nibble of the last byte is not 0")
        return stored

    def unpacked(self, parts, nnz: int) -> torch.Tensor:
        """The integers [nnz] (int8)."""
        stored = self.check_qvalues(parts, nnz)
        return stored if self.bits == 8 else unpack_int4(stored, nnz)

    def check_scales(self, scales: torch.Tensor, shape, dtype, group_size: int) -> None:
        count = num_scales(shape, group_size)
        if scales.dtype != dtype or scales.dim() != 1 or scales.numel() != count:
            raise FormatError(f"scales is {scales.dtype}{list(scales.shape)}, expected "
                              f"{dtype}[{count}]")
        if not _all_finite(scales):
            raise FormatError(f"{self.name} scales hold NaN or infinity")

    def check_parts(self, params, parts, shape, dtype, nnz) -> None:
        """Rules Q2 and Q3 on parts read from a file, before decoding (O(scales))."""
        self.check_qvalues(parts, nnz)
        self.check_scales(parts[SCALES], shape, dtype, params["group_size"])

    def decode_values(self, params, parts, tiles, dtype, *, shape=None, mask=None):
        if shape is None or mask is None:
            raise ValueError(f"the {self.name} codec decodes values from their positions: pass "
                             "shape= and mask=")
        nnz = int(tiles[-1])
        q = self.unpacked(parts, nnz)
        scales = parts[SCALES]
        self.check_scales(scales, shape, dtype, params["group_size"])
        index = group_index(mask.reshape(-1).nonzero().squeeze(1), shape, params["group_size"])
        return dequantize(q, scales[index], dtype)


register_codec(QuantCodec(8))
register_codec(QuantCodec(4))
