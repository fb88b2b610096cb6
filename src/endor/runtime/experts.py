"""Mixture-of-experts layers: read only the experts the router picks, keep the hot ones.

A decoder layer's attention, norms and router stream (or stay resident) like any layer
(stream.py), from the prefix of its shard; its experts sit after that prefix, one contiguous
byte range each (docs/FORMAT.md section 2). The model's fused experts module is replaced by
RoutedExperts, which computes exactly as transformers' reference ("eager") experts do, expert
after expert in increasing order, and asks an ExpertStore for each chosen expert's dense
weights:

    union of the batch's choices -> cache hits: the compressed bytes held in RAM
                                 -> misses: O_DIRECT reads of their byte ranges, all issued at
                                    once (8 in flight; the disk queues them), taken in order
    each expert: verify (XXH3 of its bytes vs the digest taken at load), decompress gate and up
    into one [2I, H] buffer and down into [H, I], compute, reuse the buffers for the next.

When the layers' attention and router stream too (a budget below them), the layer stream keeps
reading the next layers' prefixes on its own threads while this layer's experts are read.
The cache holds compressed expert images within the memory budget left after the resident
weights, evicting by LRU or by use count (LFU); its hits and misses go to endor_stats()."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import xxhash
from torch import nn

from ..errors import FormatError
from ..format import EndorFile, spec
from ..format.io import check_compressed, endor_tensor
from ..format.spec import SAFETENSORS_DTYPES
from ..kernels import decompress
from ..moe import ExpertNames
from .expert_cache import POLICIES, ExpertCache
from .reader import ALIGN, aligned_buffer, round_up

READ_THREADS = 8  # expert reads in flight: top-k of a layer at once (threads wait in the kernel)


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


def decompress_expert(layer: ExpertLayer, expert: Expert, image: torch.Tensor, gate_up: torch.Tensor,
                  down: torch.Tensor, backend: str) -> None:
    """Decompress one expert from `image` (its byte range) into gate_up [2I, H] (gate rows, then
    up rows: transformers' concatenation) and down [H, I]."""
    n = layer.intermediate * layer.hidden
    flat = gate_up.view(-1)
    for t, out in zip(expert.tensors, (flat[:n], flat[n:], down.view(-1))):
        parts = [_typed(image, s, e, d) for s, e, d in t.parts]
        if t.compressed:
            et = endor_tensor(t.entry, dict(zip(t.suffixes, parts)), t.version)
            try:
                decompress(et, out=out.view(t.shape), backend=backend)
            except FormatError as e:
                raise e.at(path=layer.file) from None
        else:
            out.copy_(parts[0].view(-1))


class ExpertStore:
    """Dense weights of chosen experts, from the cache, RAM (cpu offload) or disk."""

    def __init__(self, layers: list[ExpertLayer], *, held: bool, cache_bytes: int,
                 policy: str, backend: str, direct: bool, metrics, device=None):
        self.layers = {x.index: x for x in layers}
        self.backend, self.metrics = backend, metrics
        self.cache = ExpertCache(0 if held else cache_bytes, policy)
        self.hits = self.misses = self.bytes_read = 0
        self.digests: dict = {}
        self.held: dict | None = {} if held else None
        self._direct = direct and hasattr(os, "O_DIRECT")
        self._fds: dict = {}
        self._pool = None
        self._lock = threading.Lock()
        span = max(x.nbytes for layer in layers for x in layer.experts)
        self._span = round_up(span) + ALIGN
        self._buffers = [aligned_buffer(self._span) for _ in range(READ_THREADS)]
        biggest = max(layers, key=lambda x: x.intermediate * x.hidden)
        # Compressed bytes stay in host memory; a GPU gets them right before decompressing there.
        self.device = torch.device(device or "cpu")
        self._gate_up = torch.empty(2 * biggest.intermediate * biggest.hidden,
                                    dtype=biggest.dtype, device=self.device)
        self._down = torch.empty(biggest.intermediate * biggest.hidden, dtype=biggest.dtype,
                                 device=self.device)
        self._check_all()

    # ---- load time ------------------------------------------------------------------------
    def _check_all(self) -> None:
        """Read every expert once: rules 5 and 7 of each Endor tensor, and the digest each later
        read must match (cpu offload: keep the bytes)."""
        for layer in self.layers.values():
            for e, expert in enumerate(layer.experts):
                image = self._read(layer, expert, self._buffers[0])
                for t in expert.tensors:
                    if t.compressed:
                        parts = [_typed(image, s, x, d) for s, x, d in t.parts]
                        check_compressed(endor_tensor(t.entry, dict(zip(t.suffixes, parts)),
                                                      t.version), path=layer.file,
                                         name=f"layer {layer.index} expert {e}")
                self.digests[(layer.index, e)] = xxhash.xxh3_64_intdigest(
                    memoryview(image.numpy()))
                if self.held is not None:
                    self.held[(layer.index, e)] = image.clone()
        self.bytes_read = 0

    # ---- reads ----------------------------------------------------------------------------
    def _fd(self, path: str) -> tuple[int, bool]:
        with self._lock:
            if path not in self._fds:
                fd, direct = None, False
                if self._direct:
                    try:
                        fd, direct = os.open(path, os.O_RDONLY | os.O_DIRECT), True
                    except OSError:
                        pass
                if fd is None:
                    fd = os.open(path, os.O_RDONLY)
                self._fds[path] = (fd, direct)
            return self._fds[path]

    def _read(self, layer: ExpertLayer, expert: Expert, buf: torch.Tensor) -> torch.Tensor:
        """Expert bytes from disk into `buf` (aligned), returned as a view of exactly them."""
        fd, direct = self._fd(layer.file)
        lo = expert.start - expert.start % ALIGN
        hi = round_up(expert.end)
        view = memoryview(buf.numpy())
        pos = lo
        while pos < expert.end:
            try:
                got = os.preadv(fd, [view[pos - lo:hi - lo]], pos)
            except OSError as e:
                raise FormatError(f"cannot read expert bytes: {e.strerror or e}",
                                  path=layer.file) from None
            if got <= 0:
                raise FormatError("the file ended inside an expert (truncated since it was "
                                  "opened)", path=layer.file)
            pos += got
        if not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)  # stay cold
        with self._lock:
            self.bytes_read += expert.nbytes
        return buf[expert.start - lo:expert.end - lo]

    def weights(self, index: int, chosen: list[int]):
        """Yield (expert, gate_up [2I, H], down [H, I]) for `chosen` (increasing) of decoder
        layer `index`; the two buffers are reused by the next expert."""
        layer = self.layers[index]
        images, pending = {}, {}
        for e in chosen:
            key = (index, e)
            image = self.held[key] if self.held is not None else self.cache.get(key)
            if image is not None:
                images[e] = image
                self.hits += self.held is None
            else:
                self.misses += 1
                pending[e] = None
        if pending:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="endor-experts")
            # more misses than buffers: the later ones wait for a buffer the first ones free
            for slot, e in enumerate(list(pending)[:len(self._buffers)]):
                pending[e] = self._pool.submit(self._read, layer, layer.experts[e],
                                               self._buffers[slot])
        gate_up = self._gate_up[:2 * layer.intermediate * layer.hidden].view(
            2 * layer.intermediate, layer.hidden)
        down = self._down[:layer.intermediate * layer.hidden].view(layer.hidden,
                                                                   layer.intermediate)
        order = list(pending)
        for e in chosen:
            t0 = time.perf_counter()
            image = images.get(e)
            stall = read = 0.0
            if image is None:
                k = order.index(e)
                image = pending[e].result()
                stall = time.perf_counter() - t0
                if xxhash.xxh3_64_intdigest(memoryview(image.numpy())) != \
                        self.digests[(index, e)]:
                    raise FormatError(f"checksum mismatch in expert {e} of decoder layer "
                                      f"{index}: the file changed on disk or is corrupt",
                                      path=layer.file)
                self.cache.put((index, e), image)
                read = layer.experts[e].nbytes
            t1 = time.perf_counter()
            if self.device.type != "cpu":
                image = image.to(self.device)
            decompress_expert(layer, layer.experts[e], image, gate_up, down, self.backend)
            if read and k + len(self._buffers) < len(order):  # its buffer is free: next read
                later = order[k + len(self._buffers)]
                pending[later] = self._pool.submit(self._read, layer, layer.experts[later],
                                                   self._buffers[k % len(self._buffers)])
            if self.metrics is not None:
                self.metrics.add_expert(read, layer.experts[e].nbytes, stall,
                                        time.perf_counter() - t1)
            yield e, gate_up, down

    def stats(self) -> dict:
        lookups = self.hits + self.misses
        return {"expert_cache_policy": self.cache.policy,
                "expert_cache_capacity_bytes": self.cache.capacity,
                "expert_cache_bytes": self.cache.nbytes,
                "expert_cache_entries": len(self.cache.items),
                "expert_hits": self.hits, "expert_misses": self.misses,
                "expert_hit_rate": self.hits / lookups if lookups else 0.0,
                "expert_bytes_read": self.bytes_read,
                "expert_held_bytes": sum(t.numel() for t in self.held.values())
                if self.held else 0}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        with self._lock:
            for fd, _ in self._fds.values():
                os.close(fd)
            self._fds.clear()


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
        with torch.no_grad():
            expert_mask = torch.nn.functional.one_hot(top_k_index,
                                                      num_classes=self.num_experts + 1)
            expert_mask = expert_mask.permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        chosen = [int(e) for e in expert_hit[:, 0].tolist() if e != self.num_experts]
        for e, gate_up, down in self.source(self.index, chosen):
            top_k_pos, token_idx = torch.where(expert_mask[e])
            current_state = hidden_states[token_idx]
            gate, up = nn.functional.linear(current_state, gate_up).chunk(2, dim=-1)
            current_hidden_states = self.act_fn(gate) * up
            current_hidden_states = nn.functional.linear(current_hidden_states, down)
            current_hidden_states = current_hidden_states * top_k_weights[token_idx, top_k_pos,
                                                                          None]
            final_hidden_states.index_add_(0, token_idx,
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


__all__ = ["ExpertCache", "ExpertLayer", "ExpertStore", "POLICIES", "RoutedExperts",
           "decompress_expert", "layer_views_source", "plan_experts"]
