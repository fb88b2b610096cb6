"""load_model: a transformers model whose decoder layers stream from an Endor checkpoint.

The model is built on the meta device (no dense copy of it ever exists in RAM); the non-layer
weights (embeddings, final norm, LM head) and as many decoder layers as `max_memory` allows are
loaded resident, dense; the other layers get a forward pre-hook that swaps in the dense views of
their streamed weights and a post-hook that hands the slot back (stream.py)."""

from __future__ import annotations

import contextlib
import os
import weakref

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..errors import FormatError
from ..kernels import choose
from . import fused
from .metrics import Metrics
from .plan import parse_size, plan_layer, plan_memory
from .reader import ShardReader
from .rest import StreamedHead, offload_rest, rest_size
from .stream import LayerStream
from .expert_store import ExpertStore
from .experts import POLICIES, RoutedExperts, layer_views_source, plan_experts
from .moe_layers import (load_resident_experts, moe_layers, plan_moe_layer, replace_experts,
                         use_eager_experts, without_experts)
from .weights import (check_streamed, find_layer_list, layer_files, load_resident_layer,
                      load_rest, model_dtype)

OFFLOAD = ("disk", "cpu")


def check_device(device) -> torch.device:
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but no CUDA device is available; use device='cpu'")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _empty_model(path, dtype: torch.dtype):
    """The architecture of config.json with every parameter on the meta device; buffers (e.g.
    the rotary inv_freq, which no checkpoint holds) are computed for real."""
    # lazy: heavy (transformers/accelerate), kept out of `import endor` and `endor --help`
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FormatError(f"cannot read config.json ({e})", path=path) from None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with contextlib.suppress(OSError, ValueError):
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model.eval()


def thread_split(device: torch.device, streaming: bool, compute_threads: int | None = None,
                 decompress_threads: int | None = None) -> tuple[int | None, int | None]:
    """(compute, decompress) CPU threads. Computing on the CPU while streaming, the decompressor
    gets a core of its own (two on larger machines) and the model's forward the others: with every
    core given to torch's OpenMP compute, the decompressor thread preempts it in the middle of
    parallel regions and each of them waits for a time slice (measured 5-9x slower decode tokens/s
    on 2 cores). None leaves torch's setting alone (GPU compute, or nothing streamed)."""
    if device.type != "cpu" or not streaming:
        return compute_threads, None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    decompress = decompress_threads or (1 if cores <= 4 else 2)
    return compute_threads or max(1, cores - decompress), decompress


def load_model(path, *, device="cpu", offload: str = "disk", max_memory=None, prefetch: int = 1,
               backend: str = "auto", compute_threads: int | None = None,
               direct_io: bool = True, expert_reads: bool = True, expert_cache: str = "lfu",
               model: nn.Module | None = None, compute: str = "auto", verify: bool = True,
               decompress_threads: int | None = None):
    """Load a converted checkpoint (weights "endor" or "dense") for offloaded inference.

    device: where it computes ("cpu", "cuda"). offload: where streamed layers live between
    uses, "disk" (read with O_DIRECT for every forward) or "cpu" (their compressed bytes held in
    host memory). max_memory: bytes for resident weights (int, "500MB", "2GiB", {"cuda": ...});
    None keeps every layer resident, 0 streams every layer. Streaming buffers come on top and
    are reported by model.endor_stats(): read slots (the largest shard each) and one dense slot
    (the largest decompressed layer; dense weights are used in place, in the read slots).
    prefetch: layers loading ahead of the one computing: prefetch+1 read slots, or as many
    compressed shards as fit in the memory of prefetch+1 dense layers (stream.read_slot_count).
    backend: decompressor (see endor.decompress).
    compute_threads: torch threads during the model's forward (default: see thread_split).
    decompress_threads: threads of the streamed layers' decompressor (default: thread_split).
    direct_io: read shards with O_DIRECT (default); False reads them buffered and evicts them
    from the page cache right after (cold reads either way; faster on some virtual disks where
    transparent huge pages are off: see reader.py).
    expert_reads (mixture-of-experts models, with a max_memory): read only the experts the
    router picks, one byte range each, keeping hot ones compressed in the memory the resident
    layers leave (runtime/experts.py); False streams MoE layers whole, experts and all.
    expert_cache: "lfu" (keep the most used experts) or "lru".
    model: fill this model instead of building one: the architecture of the checkpoint's
    config.json with its parameters on the meta device and its buffers real (transformers'
    from_pretrained hands over its own: endor.integrations.hf_quantizer).
    compute: "fused" keeps decoder Linear weights compressed, resident ones counted in the budget
    at their compressed size, streamed ones used straight from their read buffer, and computes
    from the compressed form for a few tokens (decode), decompress + GEMM for many (prefill);
    "dense" decompresses every layer; "auto" (default) is fused for the layers whose codec the
    fused kernel reads, dense for the others (runtime/fused.py resolve_compute says why).
    verify: True (default) checks every streamed shard's (and routed expert's) stored checksums
    at load and every later read of it against the digest taken then (docs/FORMAT.md, "What is checked when").
    False skips both, so a shard corrupted or changed on disk reaches the model unnoticed: it
    exists to measure what checking costs (`endor bench e2e --checks on,off`), not for use.
    Resident and non-layer weights are checked when loaded either way (once, not per token).

    Returns the model (generate() works) with endor_stats(), endor_reset_stats() and
    endor_close() attached; or use `with endor.runtime.open_model(...) as model:`."""
    device = check_device(device)
    if offload not in OFFLOAD:
        raise ValueError(f"offload must be one of {OFFLOAD}, got {offload!r}")
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch must be an integer >= 0, got {prefetch!r}")
    if expert_cache not in POLICIES:
        raise ValueError(f"expert_cache must be one of {POLICIES}, got {expert_cache!r}")
    if not isinstance(verify, bool):
        raise ValueError(f"verify must be True or False, got {verify!r}")
    for name, value in (("compute_threads", compute_threads),
                        ("decompress_threads", decompress_threads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or
                                  value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    budget = parse_size(max_memory, device=str(device))
    choose(backend, device)  # an unknown or unavailable backend fails now, not mid-generation

    ckpt = Checkpoint(path)
    compute = fused.resolve_compute(compute, device, ckpt.weights)
    files, rest_file = layer_files(ckpt)
    if model is None:
        model = _empty_model(ckpt.path, model_dtype([rest_file, *files[:1]]))
    layer_path, layers = find_layer_list(model, files[0].keys() if files else [], len(files))
    prefixes = [f"{layer_path}.{i}." for i in range(len(files))]
    moe = moe_layers(layers, files, prefixes)
    use_eager_experts(model)
    routed = expert_reads and budget is not None  # no budget: every expert resident, dense
    plans, kept = [], []
    for i, (layer, f) in enumerate(zip(layers, files)):
        plan = plan_moe_layer(i, f, prefixes[i], layer, moe.get(i), routed)
        names = fused.layer_names(layer, plan, compute, device) if i not in moe \
            else frozenset()
        if names:
            expected = {n: (t.shape, t.dtype) for n, t in layer.state_dict(keep_vars=True).items()}
            plan = plan_layer(i, f, prefixes[i], expected, keep_compressed=names)
            fused.install(layer, names, backend=backend)
        plans.append(plan)
        kept.append(names)

    skip, floor = frozenset(), 0
    if budget and budget < rest_size(rest_file):  # no fixed floor: see runtime/rest.py
        skip, floor = offload_rest(model, rest_file, device=device, budget=budget)
    rest_bytes = floor + load_rest(model, rest_file, f"{layer_path}.", device=device,
                                   backend=backend, skip=skip)
    memory = plan_memory(budget, rest_bytes,
                         [fused.resident_bytes(p, names) for p, names in zip(plans, kept)])
    for i in memory.resident:
        if kept[i]:
            fused.load_resident(layers[i], files[i], plans[i], prefixes[i], kept[i],
                                device=device, backend=backend)
        else:
            load_resident_layer(layers[i], files[i], without_experts(plans[i], moe.get(i)),
                                prefixes[i], device=device, backend=backend)
        if i in moe and not routed:
            load_resident_experts(layers[i], files[i], prefixes[i], moe[i], device=device,
                                  backend=backend)

    metrics = Metrics()
    head = model.get_output_embeddings()
    if isinstance(head, StreamedHead):
        head.metrics = metrics
    # Streamed layers, fused or not, and routed experts keep a core away from the compute: the
    # loader verifies each shard (and decompresses, dense compute) and the reads complete there.
    # Fused streamed layers on both cores ran 0.77 s/token against 0.47 on one (raw values, the
    # e2e model, 2 shared cores at load 12): every OpenMP barrier and kernel join waits for a
    # time slice whenever anything else runs. Routed experts: their decode thread (expert_store).
    threads, decompress_threads = thread_split(
        device, bool(memory.streamed) or bool(routed and moe), compute_threads,
        decompress_threads)
    store = None
    if routed and moe:
        cache = max(0, (memory.budget or 0) - memory.resident_bytes)
        store = ExpertStore([plan_experts(i, files[i], prefixes[i], moe[i], layers[i]
                                          .get_submodule(moe[i].module).gate_up_proj.dtype)
                             for i in sorted(moe)], held=offload == "cpu", cache_bytes=cache,
                            policy=expert_cache, backend=backend, direct=direct_io,
                            metrics=metrics, device=device, decode_threads=decompress_threads,
                            verify=verify)
        for i, names in moe.items():
            replace_experts(layers[i], names, RoutedExperts(
                layers[i].get_submodule(names.module), i, store.weights))
    expert_views: dict = {}
    for i in memory.streamed:
        if i in moe and not routed:  # whole layers: the stream hands the experts over
            expert_views[i] = {}
            replace_experts(layers[i], moe[i], RoutedExperts(
                layers[i].get_submodule(moe[i].module), i,
                layer_views_source(moe, expert_views)))
    reader = ShardReader(direct=direct_io)
    stream = None
    if memory.streamed:
        streamed = [plans[i] for i in memory.streamed]
        try:
            digests, held = check_streamed(streamed, reader, hold=offload == "cpu",
                                           pin=device.type == "cuda", verify=verify)
            if offload == "cpu":
                reader.close()  # everything is in RAM now
            stream = LayerStream(streamed, device=device, prefetch=prefetch, backend=backend,
                                 reader=reader if offload == "disk" else None, digests=digests,
                                 held=held, metrics=metrics, decompress_threads=decompress_threads,
                                 verify=verify)
        except BaseException:
            reader.close()
            raise
        for i in memory.streamed:
            _install_stream_hooks(layers[i], i, stream, kept[i], expert_views.get(i))
    install_metric_hooks(model, metrics, threads, device)
    _attach_api(model, stream, store, metrics, memory, plans, reader,
                {"path": str(ckpt.path), "weights": ckpt.weights, "device": str(device),
                 "offload": offload, "prefetch": prefetch, "backend": backend,
                 "compute": compute, "verify": verify, "fused_layers": sum(bool(k) for k in kept),
                 "compute_threads": threads or torch.get_num_threads(),
                 "decompress_threads": decompress_threads})
    return model


def _install_stream_hooks(layer: nn.Module, index: int, stream: LayerStream,
                          kept: frozenset[str] = frozenset(),
                          expert_views: dict | None = None) -> None:
    """`kept`: Endor weights used compressed (fused compute). `expert_views`: where an MoE layer
    streamed whole puts its per-expert tensors (they are no parameters of the model:
    RoutedExperts takes them from there)."""
    placeholders = dict(layer.state_dict(keep_vars=True))  # the meta tensors, put back after use
    placeholders.update(dict.fromkeys(kept))  # Endor weights: none between uses

    def swap_in(module, args):
        for name, view in stream.acquire(index).items():
            if expert_views is not None and ".experts." in name and name not in placeholders:
                expert_views[name] = view
            else:
                fused.set_weight(module, name, view)

    def swap_out(module, args, output):
        for name, meta in placeholders.items():
            fused.set_weight(module, name, meta)
        if expert_views:
            expert_views.clear()
        stream.release(index)

    layer.register_forward_pre_hook(swap_in)
    layer.register_forward_hook(swap_out, always_call=True)


def install_metric_hooks(model: nn.Module, metrics: Metrics, threads: int | None = None,
                          device: torch.device | None = None) -> None:
    """Phase and timing of every forward; torch runs it with `threads` threads (restored after:
    the caller's setting is untouched outside the model's forward). On a CUDA `device` the
    forward's end waits for its kernels, so its time is the GPU's, not the launches'."""
    saved = []
    cuda = device is not None and device.type == "cuda"

    def begin(module, args, kwargs):
        if threads:
            if not saved:  # after a Ctrl-C skipped `end`, the caller's value is still here
                saved.append(torch.get_num_threads())
            torch.set_num_threads(threads)
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs.get("inputs_embeds")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # renamed in transformers 5
        past = cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0
        metrics.begin_forward("prefill" if past == 0 else "decode",
                              int(x.shape[1]) if x is not None and x.dim() > 1 else 1)

    def end(module, args, kwargs, output):
        if cuda:
            torch.cuda.synchronize(device)
        metrics.end_forward()
        if saved:
            torch.set_num_threads(saved.pop())

    model.register_forward_pre_hook(begin, with_kwargs=True)
    model.register_forward_hook(end, with_kwargs=True, always_call=True)


def _attach_api(model, stream, store, metrics, memory, plans, reader, info) -> None:
    def endor_stats() -> dict:
        streamed = [plans[i] for i in memory.streamed]
        return {
            **(store.stats() if store is not None else {}),
            **info,
            **metrics.summary(),
            "layers": len(plans),
            "resident_layers": list(memory.resident),
            "streamed_layers": list(memory.streamed),
            "budget_bytes": memory.budget,
            "resident_bytes": memory.resident_bytes,
            "streamed_shard_bytes": sum(p.file_size for p in streamed),
            "streamed_dense_bytes": sum(p.weight_bytes for p in streamed),
            "buffer_host_bytes": stream.host_buffer_bytes if stream else 0,
            "buffer_device_bytes": stream.device_buffer_bytes if stream else 0,
            "held_host_bytes": sum(t.numel() for t in stream.held.values())
            if stream and stream.held else 0,
            "read_slots": len(stream.read_slots) if stream else 0,
            "dense_slots": len(stream.dense_slots) if stream else 0,
            "direct_io": bool(stream and stream.reader and reader.direct),
            "direct_io_fallback": reader.fallback_reason,
        }

    def endor_close() -> None:
        if stream is not None:
            stream.close()
        if store is not None:
            store.close()

    model.endor_stats = endor_stats
    model.endor_reset_stats = metrics.reset
    model.endor_close = endor_close
    model.endor_memory_plan = memory
    model._endor_stream = stream  # for tests and profiling
    if stream is not None:
        weakref.finalize(model, stream.close)
    if store is not None:
        weakref.finalize(model, store.close)


@contextlib.contextmanager
def open_model(path, **kwargs):
    """`with open_model(path, ...) as model:` closes the stream (threads joined, buffers freed)
    on exit, including on Ctrl-C."""
    model = load_model(path, **kwargs)
    try:
        yield model
    finally:
        model.endor_close()
