"""From a checkpoint and a memory budget to a plan: which decoder layers stay resident, which
stream, and where each streamed tensor sits in a shard's file image and in the dense buffer.

Everything here is decided once, at load time, from the safetensors headers alone; the streaming
loop then only follows byte offsets."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import FormatError
from ..format import EndorFile, spec
from ..format.spec import ITEMSIZE, SAFETENSORS_DTYPES
from ..format.validate import Entry

OUT_ALIGN = 64  # cache line: every dense output and staged part starts on one

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(value, *, device: str = "cpu") -> int | None:
    """Bytes from an int, a string like "500MB" / "2GiB", or an Accelerate-style dict keyed by
    device ({"cpu": "2GiB"}). None means no limit."""
    if value is None:
        return None
    if isinstance(value, dict):
        for key in (device, torch.device(device).type, torch.device(device).index):
            if key in value:
                return parse_size(value[key], device=device)
        raise ValueError(f"max_memory has no entry for device {device!r}: {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"max_memory must be bytes (int), a size string like '2GiB', a dict or "
                        f"None; got {type(value).__name__}")
    if isinstance(value, (int, float)):
        number, unit = value, ""
    else:
        m = _SIZE.match(value)
        if not m or m.group(2).lower() not in _UNITS:
            raise ValueError(f"cannot read size {value!r}; write e.g. 500MB, 2GiB or 1000000")
        number, unit = float(m.group(1)), m.group(2)
    if number < 0 or not math.isfinite(number):
        raise ValueError(f"max_memory must be a non-negative size, got {value!r}")
    return int(number * _UNITS[unit.lower()])


def align(n: int, multiple: int = OUT_ALIGN) -> int:
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class Part:
    """One stored safetensors tensor inside a shard's file image. `staging` is an offset in the
    slot's dense buffer where the bytes are first copied when they are not aligned for a view."""
    start: int
    end: int
    dtype: torch.dtype
    staging: int | None = None


@dataclass(frozen=True)
class TensorPlan:
    name: str  # relative to the decoder layer module, e.g. "self_attn.q_proj.weight"
    shape: torch.Size
    dtype: torch.dtype  # the model's dtype for it
    parts: tuple[Part, ...]  # an Endor tensor's parts (in `entry`'s checksum order), or (data,)
    compressed: bool
    checksum: str | None  # the stored XXH3 (None: a dense tensor of a file without checksums)
    out: int | None  # offset of the dense result in the slot's dense buffer; None: image view
    entry: Entry | None = None  # an Endor tensor's metadata entry (codec, params, nnz)
    suffixes: tuple[str, ...] = ()  # an Endor tensor's part suffixes, in `parts` order
    version: int = 2  # format version of the file (its checksum rule)
    stored: tuple = ()  # a dense tensor's safetensors (dtype name, shape), what its checksum covers
    source_name: str = ""  # its name in the shard, relative to the layer, if not `name`

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class LayerPlan:
    index: int
    file: Path
    file_size: int  # bytes read per load: the whole shard, or an MoE layer's prefix before its
    # experts (read one by one: runtime/experts.py)
    tensors: tuple[TensorPlan, ...]
    dense_buffer_bytes: int  # what decompressing this layer needs in a slot's dense buffer
    weight_bytes: int  # the layer's weights, dense, as they count against the budget

    @property
    def keeps_image(self) -> bool:
        """Whether some weight is a view of the shard image (which then lives until the layer
        has computed), rather than decompressed or copied into the dense buffer."""
        return any(tp.out is None for tp in self.tensors)


def plan_layer(index: int, f: EndorFile, prefix: str, expected: dict,
               keep_compressed: frozenset[str] = frozenset(), *, skip=(),
               model_name=None) -> LayerPlan:
    """Lay out decoder layer `index` stored in `f` (tensor names `prefix` + relative name) for a
    model whose layer holds `expected` = {relative name: (shape, dtype)}. Endor tensors named in
    `keep_compressed` are not decompressed: they stay views of the shard image (fused compute).
    `skip`: relative stored names read elsewhere (an MoE layer's experts, stored last: only the
    shard's prefix before them is read); `model_name`: stored relative name -> the model's
    (endor.moe)."""
    all_names = {n[len(prefix):]: n for n in f.keys() if n.startswith(prefix)}
    names = {(model_name or str)(rel): full for rel, full in all_names.items() if rel not in skip}
    unexpected = sorted(set(f.keys()) - set(all_names.values()))
    if unexpected:
        raise FormatError(f"holds {unexpected[:3]} outside decoder layer {index} ({prefix}*)",
                          path=f.path)
    missing = sorted(set(expected) - set(names))
    if missing:
        raise FormatError(f"decoder layer {index} lacks {missing[:3]} that the model config needs",
                          path=f.path)
    extra = sorted(set(names) - set(expected))
    if extra:
        raise FormatError(f"decoder layer {index} holds {extra[:3]}, which the model config has "
                          "no place for (config.json does not match the weights)", path=f.path)
    cursor = 0
    plans = []

    def reserve(nbytes: int) -> int:
        nonlocal cursor
        offset = cursor
        cursor = align(cursor + nbytes)
        return offset

    def part(stored_name: str) -> Part:
        st = f.header.tensors[stored_name]
        dtype = SAFETENSORS_DTYPES[st.dtype]
        aligned = st.start % dtype.itemsize == 0
        return Part(st.start, st.end, dtype, None if aligned else reserve(st.end - st.start))

    # A layer with compressed tensors is decompressed into the dense buffer whole (its few dense
    # tensors copied beside them), so its shard image can be reused as soon as it is decompressed;
    # a dense layer is used in place, a view of its image (no copy at all).
    any_compressed = any(f.is_compressed(names[rel]) for rel in expected
                         if rel not in keep_compressed)
    for rel in sorted(expected):
        shape, dtype = expected[rel]
        full = names[rel]
        entry, suffixes, stored = None, (), ()
        if f.is_compressed(full):
            entry = f.entry(full)
            stored_shape, stored_dtype, digest = entry.shape, entry.dtype, entry.checksum
            suffixes = tuple(f.part_suffixes(full))
            parts = tuple(part(spec.part_name(full, s)) for s in suffixes)
            compressed = True
        else:
            st = f.header.tensors[full]
            stored_shape, stored_dtype = torch.Size(st.shape), SAFETENSORS_DTYPES[st.dtype]
            digest, stored = f.dense_checksum(full), (st.dtype, tuple(st.shape))
            parts = (part(full),)
            compressed = False
        if tuple(stored_shape) != tuple(shape):
            raise FormatError(f"has shape {list(stored_shape)}, the model expects {list(shape)}",
                              path=f.path, tensor=full)
        if compressed and stored_dtype != dtype:
            raise FormatError(f"is stored compressed as {stored_dtype} but the model runs in "
                              f"{dtype}; every compressed weight must have the model's dtype",
                              path=f.path, tensor=full)
        if not stored_dtype.is_floating_point and dtype.is_floating_point:
            raise FormatError(f"is {stored_dtype}, the model expects a float", path=f.path,
                              tensor=full)
        in_place = rel in keep_compressed or (not any_compressed and stored_dtype == dtype
                                              and all(p.staging is None for p in parts))
        out = None if in_place else reserve(math.prod(shape) * dtype.itemsize)
        stored_rel = full[len(prefix):]
        plans.append(TensorPlan(rel, torch.Size(shape), dtype, parts, compressed, digest, out,
                                entry, suffixes, f.version or 1, stored,
                                stored_rel if stored_rel != rel else ""))
    weight_bytes = sum(p.nbytes for p in plans)
    read = f.header.file_size
    if skip:
        read = max((p.end for tp in plans for p in tp.parts), default=f.header.data_start)
    return LayerPlan(index, f.path, read, tuple(plans), cursor, weight_bytes)


@dataclass(frozen=True)
class MemoryPlan:
    budget: int | None  # bytes for resident weights; None: no limit
    rest_bytes: int
    resident: tuple[int, ...]  # decoder layers kept on the device, dense
    streamed: tuple[int, ...]  # decoder layers read for every forward, in execution order
    layer_bytes: tuple[int, ...]  # dense weight bytes of every decoder layer

    @property
    def resident_bytes(self) -> int:
        return self.rest_bytes + sum(self.layer_bytes[i] for i in self.resident)


def plan_memory(budget: int | None, rest_bytes: int, layer_bytes: list[int]) -> MemoryPlan:
    """Keep the first decoder layers resident while their dense weights fit in the budget after
    the non-layer weights; stream the rest. Streaming the last layers, not a scattered set,
    keeps the cyclic prefetch simple: while the resident layers and the LM head compute, the
    first streamed layers of the next token are already loading.

    A budget of 0 means "the least possible" with the non-layer weights resident: every decoder
    layer streamed. A budget below the non-layer weights reaches here with the embeddings and
    LM head already out of them (runtime/rest.py); below what is left it is an error."""
    if budget == 0:
        budget = rest_bytes
    if budget is not None and budget < rest_bytes:
        raise ValueError(f"max_memory of {budget:,} bytes is smaller than the weights outside the "
                         f"decoder layers that stay resident ({rest_bytes:,} bytes: the final "
                         "norm and such, with the embeddings and LM head, or, below those, the "
                         f"streamed head's buffer); raise it to at least {rest_bytes:,}")
    left = math.inf if budget is None else budget - rest_bytes
    resident = []
    for i, nbytes in enumerate(layer_bytes):
        if nbytes > left:
            break
        resident.append(i)
        left -= nbytes
    streamed = tuple(range(len(resident), len(layer_bytes)))
    return MemoryPlan(budget, rest_bytes, tuple(resident), streamed, tuple(layer_bytes))


def stored_nbytes(f: EndorFile, name: str) -> int:
    """Dense bytes of a tensor as stored (Endor tensors counted decompressed)."""
    if f.is_compressed(name):
        shape, dtype, _, _ = f.entry(name)
        return math.prod(shape) * dtype.itemsize
    st = f.header.tensors[name]
    return math.prod(st.shape) * ITEMSIZE[st.dtype]
