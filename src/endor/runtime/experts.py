"""Mixture-of-experts layers: read only the experts the router picks, keep the hot ones.

A decoder layer's attention, norms and router stream (or stay resident) like any layer
(stream.py), from the prefix of its shard; its experts sit after that prefix, one contiguous
byte range each (docs/FORMAT.md section 2). The model's fused experts module is replaced by
RoutedExperts, which computes exactly as transformers' reference ("eager") experts do, expert
after expert in increasing order, taking each chosen expert's dense weights from an ExpertStore
(expert_store.py): cache hits or O_DIRECT reads of the misses' byte ranges, all issued at once,
verified and decompressed on a decode thread while the previous expert computes.

When the layers' attention and router stream too (a budget below them), the layer stream keeps
reading the next layers' prefixes on its own threads while this layer's experts are read.
The cache holds compressed expert images within the memory budget left after the resident
weights, evicting by LRU or by use count (LFU); its hits and misses go to endor_stats()."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import FormatError
from ..format import EndorFile, EndorTensor, spec
from ..format.io import endor_tensor
from ..format.spec import SAFETENSORS_DTYPES
from ..kernels import choose
from ..moe import ExpertNames
from .expert_cache import POLICIES, ExpertCache


@dataclass(frozen=True)
class ExpertTensor:
    """One stored tensor of an expert; parts' [start, end) relative to the expert's start."""
    parts: tuple  # ((start, end, dtype), ...): an Endor tensor's parts (`suffixes`) or (data,)
    shape: torch.Size
    dtype: torch.dtype
    compressed: bool
    checksum: str | None
    entry: object = None  # an Endor tensor's metadata entry (codec, params, nnz)
    suffixes: tuple = ()
    version: int = 2


@dataclass(frozen=True)
class Expert:
    start: int  # absolute file offsets of its contiguous byte range
    end: int
    tensors: tuple  # (gate, up, down) ExpertTensors

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class ExpertLayer:
    index: int  # decoder layer
    file: str
    experts: tuple  # Expert per expert index
    intermediate: int  # I
    hidden: int  # H
    dtype: torch.dtype

    @property
    def dense_bytes(self) -> int:
        return len(self.experts) * 3 * self.intermediate * self.hidden * self.dtype.itemsize


def plan_experts(index: int, f: EndorFile, prefix: str, names: ExpertNames,
                 dtype: torch.dtype) -> ExpertLayer:
    """Where each expert of decoder layer `index` sits in `f`; checks that every expert is one
    contiguous byte range, after every other tensor of the layer."""
    experts = []
    for e, triple in enumerate(names.names):
        tensors, ranges = [], []
        for rel in triple:
            full = prefix + rel
            entry, suffixes = None, ()
            if f.is_compressed(full):
                entry = f.entry(full)
                shape, stored_dtype, digest = entry.shape, entry.dtype, entry.checksum
                suffixes = tuple(f.part_suffixes(full))
                part_names = tuple(spec.part_name(full, x) for x in suffixes)
            else:
                st = f.header.tensors[full]
                shape, digest = torch.Size(st.shape), None
                stored_dtype = SAFETENSORS_DTYPES.get(st.dtype)
                part_names = (full,)
            if stored_dtype != dtype or len(shape) != 2:
                raise FormatError(f"is {stored_dtype} {list(shape)}; experts must be 2-D "
                                  f"{dtype} (the model's dtype)", path=f.path, tensor=full)
            parts = [(f.header.tensors[p].start, f.header.tensors[p].end,
                      SAFETENSORS_DTYPES[f.header.tensors[p].dtype]) for p in part_names]
            ranges += [(s, t) for s, t, _ in parts]
            tensors.append((parts, torch.Size(shape), f.is_compressed(full), digest, entry,
                            suffixes))
        start, end = min(s for s, _ in ranges), max(t for _, t in ranges)
        if sum(t - s for s, t in ranges) != end - start:
            raise FormatError(f"expert {e} of decoder layer {index} is not one contiguous byte "
                              "range (a checkpoint converted by an older endor); convert it "
                              "again", path=f.path)
        experts.append(Expert(start, end, tuple(
            ExpertTensor(tuple((s - start, t - start, d) for s, t, d in parts), shape, dtype,
                         compressed, digest, entry, suffixes, f.version or 1)
            for parts, shape, compressed, digest, entry, suffixes in tensors)))
    gate, up, down = experts[0].tensors
    inter, hidden = gate.shape
    if up.shape != gate.shape or down.shape != (hidden, inter) or any(
            tuple(t.shape for t in x.tensors) != ((inter, hidden),) * 2 + ((hidden, inter),)
            for x in experts):
        raise FormatError(f"decoder layer {index}: experts' gate/up/down shapes disagree",
                          path=f.path)
    core_end = max((st.end for n, st in f.header.tensors.items()
                    if not any(n.startswith(prefix + r) for r in names.all_names())),
                   default=f.header.data_start)
    if core_end > min(x.start for x in experts):
        raise FormatError(f"decoder layer {index}: experts are not stored after the layer's "
                          "other tensors; convert the checkpoint again", path=f.path)
    return ExpertLayer(index, str(f.path), tuple(experts), inter, hidden, dtype)


def _typed(image: torch.Tensor, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
    raw = image[start:end]
    if raw.data_ptr() % dtype.itemsize or raw.storage_offset() % dtype.itemsize:
        raw = raw.clone()  # an unaligned part (odd byte counts before it): a small copy
    return raw.view(dtype)


def expert_tensors(expert: Expert, image: torch.Tensor) -> tuple:
    """The expert's gate, up and down as views of `image` (its byte range): EndorTensors, or
    dense typed views. Built once per cached image, not per use."""
    out = []
    for t in expert.tensors:
        parts = [_typed(image, s, e, d) for s, e, d in t.parts]
        out.append(endor_tensor(t.entry, dict(zip(t.suffixes, parts)), t.version)
                   if t.compressed else parts[0])
    return tuple(out)


class Decoders:
    """The decompressor backend per values codec, chosen once (endor.decompress chooses per
    call: a tenth of an expert's decompression time, measured)."""

    def __init__(self, backend: str, device: torch.device):
        self.backend, self.device, self._chosen = backend, torch.device(device), {}

    def __call__(self, codec: str):
        if codec not in self._chosen:
            self._chosen[codec] = choose(self.backend, self.device, codec)
        return self._chosen[codec]


def decompress_tensors(layer: ExpertLayer, tensors: tuple, gate_up: torch.Tensor,
                       down: torch.Tensor, decoders: Decoders) -> None:
    """Decompress an expert's expert_tensors into gate_up [2I, H] (gate rows, then up rows:
    transformers' concatenation) and down [H, I]."""
    n = layer.intermediate * layer.hidden
    flat = gate_up.view(-1)
    for t, out in zip(tensors, (flat[:n], flat[n:], down.view(-1))):
        if not isinstance(t, EndorTensor):
            out.copy_(t.view(-1))
        elif n:
            try:
                decoders(t.values_codec).decompress(t, out)
            except FormatError as e:
                raise e.at(path=layer.file) from None


def decompress_expert(layer: ExpertLayer, expert: Expert, image: torch.Tensor,
                      gate_up: torch.Tensor, down: torch.Tensor, backend: str) -> None:
    """Decompress one expert from `image` (its byte range) into gate_up and down."""
    decompress_tensors(layer, expert_tensors(expert, image), gate_up, down,
                       Decoders(backend, gate_up.device))


class RoutedExperts(nn.Module):
    """Drop-in for transformers' fused experts module (same forward signature), computing
    exactly as its eager implementation, with each chosen expert's weights from `source`:
    a callable (layer index, chosen experts) -> iterable of (expert, gate_up, down)."""

    def __init__(self, original: nn.Module, index: int, source):
        super().__init__()
        if getattr(original, "has_bias", False) or not getattr(original, "has_gate", True) or \
                getattr(original, "is_transposed", False) or \
                not getattr(original, "is_concatenated", True):
            raise ValueError(f"{type(original).__name__}: endor streams gated, concatenated, "
                             "bias-free experts only")
        self.num_experts = original.gate_up_proj.shape[0]
        self.act_fn = original.act_fn
        self.index, self.source = index, source

    def forward(self, hidden_states, top_k_index, top_k_weights):
        final_hidden_states = torch.zeros_like(hidden_states)
        tokens = top_k_index.shape[0]
        # The eager loop's torch.where(one_hot mask[e]) gives each expert's (top-k slot, token)
        # pairs in slot-major order. A stable sort of the slot-major choices groups them so,
        # and the rows, slots and routing weights are gathered once per layer, not per expert.
        flat = top_k_index.t().reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts + 1).tolist()
        chosen = [e for e in range(self.num_experts) if counts[e]]
        ends = list(itertools.accumulate(counts))
        slots, rows = order // tokens, order % tokens
        states, weights = hidden_states[rows], top_k_weights[rows, slots, None]
        for e, gate_up, down in self.source(self.index, chosen):
            lo, hi = ends[e] - counts[e], ends[e]
            gate, up = nn.functional.linear(states[lo:hi], gate_up).chunk(2, dim=-1)
            current_hidden_states = self.act_fn(gate) * up
            current_hidden_states = nn.functional.linear(current_hidden_states, down)
            current_hidden_states = current_hidden_states * weights[lo:hi]
            final_hidden_states.index_add_(0, rows[lo:hi],
                                           current_hidden_states.to(final_hidden_states.dtype))
        return final_hidden_states


def layer_views_source(names: dict, views: dict):
    """A RoutedExperts source over a whole streamed layer (the "whole layers" mode): `views`
    {layer index: {stored relative name: dense tensor}} is filled by the stream hooks."""
    def source(index, chosen):
        layer_views = views[index]
        for e in chosen:
            g, u, d = names[index].names[e]
            yield e, torch.cat([layer_views[g], layer_views[u]], dim=0), layer_views[d]
    return source


def expert_dense_bytes(layers: list[ExpertLayer]) -> int:
    return sum(x.dense_bytes for x in layers)


__all__ = ["Decoders", "ExpertCache", "ExpertLayer", "POLICIES", "RoutedExperts",
           "decompress_expert", "decompress_tensors", "expert_tensors", "layer_views_source",
           "plan_experts"]
