"""`convert()`: an HF (or Endor) checkpoint -> an Endor checkpoint directory (docs/FORMAT.md
section 2), one decoder layer at a time in bounded memory, every shard verified after writing,
resumable.

    for each shard (the "rest" group first, then layer 0, 1, ...):
        skip it if it is already complete in OUT (a rerun resumes)
        read the layer's tensors from the source
        [wanda/sparsegpt: run the layer on the calibration activations, collect input statistics]
        prune its Linear weights, compress them, write the shard, read it back and compare
        [wanda/sparsegpt: run the pruned layer to get the next layer's inputs]

Memory holds one layer (plus the calibration activations): peak RSS does not grow with the model.
The rest shard (embeddings, head) is streamed in row chunks (rest_shard.py). Calibrated methods
run each layer on `device` (a GPU when there is one): the layer's weights and its calibration
activations go there, statistics, Hessians and pruning are computed there in float32, and the
pruned layer is compressed and written on a background thread while the next layer is read and
calibrated (at most one layer is waiting to be written).
"""

from __future__ import annotations

import ctypes
import fnmatch
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..checkpoint import WEIGHT_KINDS, CheckpointWriter
from ..data.models import resolve_model
from ..data.text import calibration_text
from ..errors import FormatError
from ..format import compress, load_file
from ..format.equal import bit_equal
from ..format.spec import DTYPES, INT_OF_SIZE
from ..kernels import decompress
from ..format.codecs import codec_names
from ..moe import parse_expert_name, to_model_names
from ..prune import (check_damping, check_settings, needs_calibration, needs_hessian,
                     prune_weight)
from . import calibrate, outdir
from .endor_source import open_source
from .progress import ConversionProgress
from .rest_shard import write_rest_shard
from .structure import ModelLayout, build_layout, load_config
from .summary import format_summary, shard_metadata, summarize

DEFAULT_VALUES = "exp"  # value codec of the Endor tensors written (docs/FORMAT.md 1.1)
_QUANTIZED = ("int8", "int4")  # the lossy codecs (docs/FORMAT.md 1.6)

REST = "rest"


def resolve_source(src) -> Path:
    """A local HF directory as is; anything else (a .gguf file, an alias such as "smollm2")
    through endor.data.models.resolve_model."""
    path = Path(src)
    if path.is_dir():
        return path
    return Path(resolve_model(str(src)))


def _count_nonzero(t: torch.Tensor) -> int:
    """Non-zero elements in the format's sense: any bit set (-0.0 counts)."""
    return int(np.count_nonzero(t.contiguous().view(INT_OF_SIZE[t.element_size()])
                                .numpy()))


def _return_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise, and a layer's many
    mid-sized buffers fragment the heap: RSS would creep up layer after layer)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@contextmanager
def _one_torch_thread():
    """Pruning and encoding run single-threaded (numpy). torch's few whole-tensor ops there
    (argument checks, the decompressor's verification) lose more at thread barriers than they gain
    on a small, busy machine: a 187 MB model converted in 3.5 s with 2 threads, 1.0 s with 1
    (2 cores shared, load 5). Reading the next tensor on a thread did not help either."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def idle_cpus() -> int:
    """CPUs not already busy by the 1-minute load average (at least 1)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cpus or 1) - round(os.getloadavg()[0]))


@contextmanager
def _calibration_threads(device: torch.device):
    """torch threads for running layers on the CPU: as many as there are idle CPUs. On a busy
    machine torch's worker threads spin at every barrier while the OS runs someone else: one
    SmolLM2 layer on 32 x 256 tokens took 19.5 s with 2 threads and 3.5 s with 1 (2 cores,
    load 16); idle, 2 threads are faster."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(min(before, idle_cpus()))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _set_params(model: nn.Module, tensors: dict) -> None:
    """Point parameters at `tensors` (or at meta tensors, to free them), without copying."""
    for name, t in tensors.items():
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._parameters[attr] = nn.Parameter(t, requires_grad=False)


def resolve_device(device) -> torch.device:
    """None: CUDA when available, else the CPU. A CUDA device asked for without one is an error
    naming the option."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device must be cpu or cuda[:N], got {device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here (use --device cpu)")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {device!r}")
    return device


def _move_buffers(module: nn.Module, device) -> None:
    for owner in module.modules():
        for name, buf in owner._buffers.items():
            if buf is not None and buf.device.type != "meta":
                owner._buffers[name] = buf.to(device)


class _Conversion:
    def __init__(self, source, layout: ModelLayout, writer: CheckpointWriter, settings: dict,
                 sparse: set, *, verify: bool, progress, device=torch.device("cpu")):
        self.source, self.layout, self.writer = source, layout, writer
        self.settings, self.sparse, self.verify, self.progress = settings, sparse, verify, progress
        self.device = device
        self.groups = {s.group: i for i, s in enumerate(writer.shards)}
        self.names = {s.group: [] for s in writer.shards}
        for name in source.names():
            i = layout.layer_of(name)
            self.names[REST if i is None else f"layers.{i}"].append(name)
        self.nnz: dict[str, int] = {}
        self.values = settings["values"]
        self.lossy = self.values in _QUANTIZED
        self.group_size = (settings.get("quantization") or {}).get("group_size")
        self.damping = (settings.get("calibration") or {}).get("damping")
        self.scales: dict[str, torch.Tensor] = {}  # SparseGPT's joint scales, until encoded
        self.errors: dict[str, list[float]] = {}  # name -> [squared error, squared weights]
        self.bytes_done, self.t0 = 0, time.perf_counter()

    # -- one shard -----------------------------------------------------------------------
    def _encode(self, name: str, t: torch.Tensor):
        """What shard files hold for `name`: an EndorTensor for a pruned Linear weight of an
        Endor checkpoint (checked to decompress back to `t` when verifying), else `t` itself."""
        if name not in self.sparse or self.writer.weights != "endor":
            if name in self.layout.linear_weights:
                self.nnz[name] = _count_nonzero(t)
            return t
        if not self.lossy:
            et = compress(t, values=self.values)
            self.nnz[name] = et.nnz
            if self.verify and not bit_equal(decompress(et), t):
                raise FormatError("verification failed: the compressed tensor does not decode "
                                  "to the pruned weight (encoder fault)", tensor=name)
            return et
        return self._quantize(name, t)

    def _quantize(self, name: str, t: torch.Tensor):
        """int8/int4: round `t` (RTN, or onto SparseGPT's joint scales), record the error on
        the kept weights, check the decoder returns the quantizer's output."""
        from ..format.codecs.quant import quantize
        bits = 8 if self.values == "int8" else 4
        scales = self.scales.pop(name, None)
        et = compress(t, values=self.values, group_size=self.group_size, scales=scales)
        self.nnz[name] = et.nnz
        decoded = decompress(et)
        if name not in self.errors:  # RTN: the error of this rounding (joint: recorded in _prune)
            t32 = t.float()
            self.errors[name] = [float((decoded.float() - t32).square().sum()),
                                 float(t32.square().sum())]
        if self.verify and not bit_equal(
                decoded, quantize(t, bits, self.group_size, scales).dequantized):
            raise FormatError("verification failed: the compressed tensor does not decompress to "
                              "the quantized weight (encoder fault)", tensor=name)
        return et

    def _finish_shard(self, group: str, stored: dict) -> None:
        """Write the shard of `group` ({name: tensor or EndorTensor}), then read it back."""
        i = self.groups[group]
        nnz = {n: self.nnz.pop(n) for n in stored if n in self.nnz}
        errors = {n: self.errors.pop(n) for n in stored if n in self.errors}
        path = self.writer.write(i, stored, shard_metadata(self.settings, nnz, errors or None),
                                 order=_expert_order(stored))
        if self.verify:
            outdir.verify_shard(path, stored)
        stored.clear()
        self._shard_done(group)

    def _shard_done(self, group: str) -> None:
        _return_free_memory()
        nbytes = sum(self.source.nbytes(n) for n in self.names[group])
        self.bytes_done += nbytes
        self.progress.shard_done(nbytes, layer=group != REST)

    def _prune(self, name: str, weight: torch.Tensor, stats=None, method=None) -> torch.Tensor:
        s = self.settings
        method = method or s["method"]
        joint = None
        if self.lossy and method == "sparsegpt":
            joint = (8 if self.values == "int8" else 4, self.group_size)
        try:
            pruned = prune_weight(weight, method=method, sparsity=s["sparsity"] or 0.0,
                                  nm=None if s["nm"] is None else tuple(s["nm"]), stats=stats,
                                  quantize=joint, damping=self.damping)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{name}: {e}") from None
        if joint is None:
            return pruned
        pruned, self.scales[name], relative = pruned
        self.errors[name] = [relative ** 2, 1.0]
        return pruned

    def rest(self) -> None:
        """Embeddings, final norm, head: streamed in row chunks (rest_shard), never held whole.
        Tied copies equal to their origin are left out: transformers ties them again on load
        (and only if equal), so storing both would duplicate them."""
        self.progress.stage(None, "writing")
        write_rest_shard(self.source, self.names[REST], self.layout.tied, self.writer,
                         self.groups[REST], shard_metadata(self.settings, {}), verify=self.verify)
        self._shard_done(REST)

    def streamed_layers(self, todo: list[int]) -> None:
        """One tensor at a time: read, prune, compress; only the compressed layer is held."""
        with _one_torch_thread():
            for i in todo:
                self.progress.stage(i, "pruning + writing" if self.settings["method"] != "none"
                                    else "writing")
                stored = {}
                for name in self.names[f"layers.{i}"]:
                    t = self.source.read(name)
                    if name in self.sparse:
                        t = self._prune(name, t)
                    stored[name] = self._encode(name, t)
                    del t
                    _return_free_memory()  # pruning and encoding temporaries
                self._finish_shard(f"layers.{i}", stored)

    def _fused(self, i: int, tensors: dict) -> dict:
        """Layer i's tensors (full stored names) as the model names them: experts fused."""
        if i not in self.layout.moe_layers:
            return tensors
        try:
            return to_model_names(self.layout.model, tensors)
        except ValueError as e:
            raise FormatError(str(e), path=self.source.path) from None

    # -- calibrated methods --------------------------------------------------------------
    def calibrated_layers(self, todo: list[int], tokens: torch.Tensor, hessian: bool) -> None:
        layout, model, device = self.layout, self.layout.model, self.device
        layers = model.get_submodule(layout.layers_prefix)
        self.progress.stage(0, "embedding the calibration tokens")
        hidden, calls = self._layer_inputs(tokens, layers)
        hidden = calibrate.place_activations(hidden, device)
        last = max(todo)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="endor-writer") as background, \
                _calibration_threads(device):
            pending = None
            for i in range(last + 1):
                group, layer = f"layers.{i}", layers[i]
                params = {f"{layout.layers_prefix}.{i}.{n}": p
                          for n, p in layer.named_parameters()}
                call = calls[i].to(device)
                _move_buffers(layer, device)
                if i in todo:
                    self.progress.stage(i, "reading")
                    originals = {name: self.source.read(name) for name in self.names[group]}
                    as_model = self._fused(i, originals)
                    missing = sorted(set(params) - set(as_model))
                    if missing:
                        raise FormatError(f"the source lacks {', '.join(missing)}, needed to run "
                                          f"layer {i} on the calibration data",
                                          path=self.source.path)
                    _set_params(model, {n: as_model[n].to(device, torch.float32)
                                        for n in params})
                    del as_model
                    targets = {n: model.get_submodule(n.removesuffix(".weight"))
                               for n in self.names[group]
                               if n in self.sparse and not self.layout.is_expert_weight(n)}
                    self.progress.stage(i, "calibrating")
                    stats = calibrate.collect_stats(layer, call, hidden, targets,
                                                    hessian=hessian, device=device)
                    self.progress.stage(i, "pruning")
                    # Experts have no module to hook (transformers fuses them): magnitude,
                    # recorded in endor.json as "expert_pruning".
                    final = {n: self._prune(n, t.to(device), stats.get(n)).cpu() if n in targets
                             else self._prune(n, t, method="magnitude") if n in self.sparse
                             else t for n, t in originals.items()}
                    del stats, originals
                    if pending is not None:
                        pending.result()  # at most one layer waits to be written
                        pending = None
                    if self.lossy:  # the next layer sees the weights the model will run with
                        self.progress.stage(i, "writing")
                        encoded = {n: self._encode(n, t) for n, t in final.items()}
                        final = {n: decompress(e) if n in self.sparse else e
                                 for n, e in encoded.items()}
                        self._finish_shard(group, encoded)  # empties `encoded`
                    else:
                        pending = background.submit(self._write_layer, i, dict(final))
                else:
                    # Already in OUT: its pruned weights, read back, give the next layer's inputs.
                    final = load_file(self.writer.path(self.groups[group]))
                if i < last:
                    self.progress.stage(i, "running the pruned layer")
                    final = self._fused(i, final)
                    _set_params(model, {n: final[n].to(device, torch.float32) for n in params})
                    hidden = calibrate.propagate(layer, call, hidden, device)
                _set_params(model, {n: torch.empty_like(p, device="meta")
                                    for n, p in params.items()})
                del final
            if pending is not None:
                pending.result()

    def _write_layer(self, i: int, final: dict) -> None:
        """Compress, write and verify decoder layer i (on the writer thread; torch's thread count
        is the process's, so it is left to the calibration running meanwhile)."""
        group = f"layers.{i}"
        self._finish_shard(group, {n: self._encode(n, t) for n, t in final.items()})

    def _layer_inputs(self, tokens: torch.Tensor, layers: nn.ModuleList):
        """Load the parameters outside the decoder layers (embeddings...) and run them."""
        model, source = self.layout.model, self.source
        head = model.get_output_embeddings()
        head_params = {id(p) for p in head.parameters()} if head is not None else set()
        head_params -= {id(p) for p in model.get_input_embeddings().parameters()}  # if tied
        outside = {n: p for n, p in model.named_parameters()
                   if self.layout.layer_of(n) is None and id(p) not in head_params}
        embedding = model.get_input_embeddings()
        embedding_weight = next((n for n, p in outside.items() if p is embedding.weight), None)
        # Only the rows of the tokens in use are read (a 128k x 8192 embedding is 4.2 GB in
        # float32), and the tokens renumbered to index them; the lookup is the same.
        used, tokens = torch.unique(tokens, return_inverse=True)
        loaded = {}
        for name in outside:
            origin = name if name in source else self.layout.tied.get(name)
            if origin is None or origin not in source:
                # a tied embedding stored under the head's name only
                origin = next((t for t, o in self.layout.tied.items() if o == name), None)
            if origin is None or origin not in source:
                raise FormatError(f"the source lacks {name}, needed to compute calibration "
                                  "activations", path=source.path)
            if name == embedding_weight:
                loaded[name] = torch.cat([source.read_rows(origin, t, t + 1)
                                          for t in used.tolist()]).float()
            else:
                loaded[name] = source.read(origin).float()
        _set_params(model, loaded)
        padding_idx = getattr(embedding, "padding_idx", None)
        try:
            if padding_idx is not None:
                embedding.padding_idx = None  # it only shapes gradients; it may not fit the rows
            return calibrate.capture_inputs(model, layers, tokens)
        finally:
            if padding_idx is not None:
                embedding.padding_idx = padding_idx
            _set_params(model, {n: torch.empty_like(t, device="meta") for n, t in loaded.items()})


def _expert_order(stored: dict) -> list[str] | None:
    """An MoE layer's per-expert tensors in storage order (expert 0's gate, up, down, then
    expert 1's...): each expert one contiguous byte range. None for a dense layer."""
    roles = {"gate": 0, "up": 1, "down": 2}
    experts = []
    for name in stored:
        parsed = parse_expert_name(name)
        if parsed is not None:
            experts.append((parsed[0], parsed[1], roles[parsed[2]], name))
    return [e[-1] for e in sorted(experts)] or None


def _settings(source, layout, method, sparsity, nm, weights, patterns, calib_text, samples,
              seqlen, values, group_size=None, damping=None):
    calibration = None
    if needs_calibration(method):
        calibration = {"text_sha256": hashlib.sha256(calib_text.encode()).hexdigest(),
                       "samples": samples, "seqlen": seqlen, "dtype": "float32"}
        if method == "sparsegpt":
            calibration["damping"] = damping
    settings = {"method": method, "sparsity": None if method == "none" else float(sparsity),
                "nm": None if nm is None else list(nm), "weights": weights,
                "values": values if weights == "endor" else None,
                "dense_patterns": sorted(patterns), "calibration": calibration,
                "source": source.fingerprint()}
    if values in _QUANTIZED:
        settings["quantization"] = {"group_size": group_size,
                                    "rounding": "joint" if method == "sparsegpt" else "rtn"}
    if layout.moe_layers and method != "none":
        # Each expert is pruned alone; calibrated methods hook nn.Linear inputs, and experts
        # are fused parameters with no module of their own.
        settings["expert_pruning"] = "magnitude" if needs_calibration(method) else method
    prior = source.prior_pruning()
    if prior is not None:  # an Endor checkpoint: how its weights were pruned already
        settings["prior_pruning"] = prior
    return settings


def _check_values(values, group_size, weights):
    """(codec, group size or None) for convert's values= / group_size= options."""
    from ..format.codecs.quant import DEFAULT_GROUP_SIZE, check_group_size
    if values not in _QUANTIZED:
        if group_size is not None:
            raise ValueError("group_size applies to values='int8' or 'int4' only")
        return values, None
    if weights != "endor":
        raise ValueError(f"values={values!r} quantizes Endor tensors; it cannot be combined "
                         "with dense weights (--format dense)")
    return values, check_group_size(DEFAULT_GROUP_SIZE if group_size is None else group_size)


def _sparse_names(source, layout, patterns) -> set:
    """Decoder Linear weights to prune and compress: all of them but those matching a pattern."""
    linear = [n for n in source.names()
              if n in layout.linear_weights or layout.is_expert_weight(n)]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in linear):
            example = linear[0] if linear else "(none)"
            raise ValueError(f"--keep-dense pattern {pattern!r} matches no decoder Linear weight "
                             f"(names look like {example!r})")
    sparse = {n for n in linear if not any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    for name in sorted(sparse):
        if source.dtype(name) not in DTYPES.values() or len(source.shape(name)) != 2:
            raise FormatError(f"decoder Linear weight is {source.dtype(name)} "
                              f"{list(source.shape(name))}: endor prunes and compresses 2-D "
                              "float32/float16/bfloat16 weights (dequantize the model first, or "
                              "keep this tensor with --keep-dense)", path=source.path, tensor=name)
    return sparse


def convert(src, out, *, method: str = "none", sparsity: float = 0.5, nm=None,
            calib_text: str | None = None, weights: str = "endor", dense_patterns=None,
            resume: bool = True, verify: bool = True, progress: bool = True,
            calib_samples: int = calibrate.DEFAULT_SAMPLES,
            calib_seqlen: int = calibrate.DEFAULT_SEQLEN, values: str = DEFAULT_VALUES,
            device=None, group_size: int | None = None, damping: float | None = None) -> dict:
    """Prune (method "none" keeps the weights as they are) and compress the model `src` into
    the checkpoint directory `out`. Returns the summary (also stored in `out/endor.json`) plus a
    "run" entry with this run's timing. See docs/FORMAT.md section 2 for the layout.

    `src` is an HF model directory, a .gguf file or alias (see resolve_source), or an Endor
    checkpoint directory, read decompressed: `convert(A, B, method="none", weights="dense")`
    makes the dense twin of the pruned checkpoint A without pruning again (B's manifest lists
    A's pruning under "prior_pruning"). `values` is the value codec of the Endor tensors
    ("exp" or "raw", docs/FORMAT.md section 1.1).

    `device` ("cpu", "cuda", "cuda:1"; default: CUDA when available) is where calibrated methods
    run each layer; magnitude pruning and compression always run on the CPU.

    values="int8" | "int4" quantizes the kept weights (lossy; docs/FORMAT.md section 1.6) in
    groups of `group_size` input columns (default 128): jointly with method "sparsegpt"
    (each column rounded as it is pruned, the error compensated), round-to-nearest otherwise
    ("none" quantizes the source's weights as they are).

    `damping` (sparsegpt): the fraction of the mean Hessian diagonal added to it, default
    prune.DAMPING (10%: robust to a calibration text unlike the served text); the paper's 1% fits
    better when the calibration text is like the text the model will serve (bench quality)."""
    method, sparsity, nm = check_settings(method, sparsity, nm)
    if damping is not None and method != "sparsegpt":
        raise ValueError(f"damping applies to method 'sparsegpt' only, not {method!r}")
    damping = check_damping(damping) if method == "sparsegpt" else None
    if weights not in WEIGHT_KINDS:
        raise ValueError(f"weights must be one of {WEIGHT_KINDS}, got {weights!r}")
    if values not in codec_names():
        raise ValueError(f"values must be one of {codec_names()}, got {values!r}")
    values, group_size = _check_values(values, group_size, weights)
    if needs_calibration(method) and calib_text is None:
        calib_text = calibration_text()
    device = resolve_device(device)
    patterns = list(dense_patterns or [])
    src_dir = resolve_source(src)
    out = Path(out)
    outdir.check_out(out, src_dir)
    source = open_source(src_dir)
    layout = build_layout(load_config(src_dir))
    sparse = _sparse_names(source, layout, patterns)
    settings = _settings(source, layout, method, sparsity, nm, weights, patterns,
                         calib_text or "", calib_samples, calib_seqlen, values, group_size,
                         damping)

    groups = [f"layers.{i}" for i in range(layout.num_layers)] + [REST]
    with outdir.replacing(out, replace=not resume) as work:
        writer = CheckpointWriter(work, groups, weights=weights)
        done = outdir.prepare(writer, settings, resume=resume)
        outdir.copy_side_files(src_dir, work)
        bar = ConversionProgress(len(groups), len(done), num_layers=layout.num_layers,
                                 calibrated=needs_calibration(method), enabled=progress)
        job = _Conversion(source, layout, writer, settings, sparse, verify=verify, progress=bar,
                          device=device)
        todo = [i for i in range(layout.num_layers) if i not in done]
        with bar:
            if len(groups) - 1 not in done:
                job.rest()
            if todo and needs_calibration(method):
                tokens = calibrate.segments(calibrate.tokenize(src_dir, calib_text),
                                            calib_samples, calib_seqlen)
                job.calibrated_layers(todo, tokens, needs_hessian(method))
            else:
                job.streamed_layers(todo)
        summary = summarize(work, [s.file for s in writer.shards], layout.layer_type,
                            layout.layer_of)
        writer.finish({k: v for k, v in settings.items() if k != "weights"}
                      | {"summary": summary})
    seconds = time.perf_counter() - job.t0
    return {**summary, "run": {
        "out": str(out), "seconds": round(seconds, 3), "source_bytes": source.total_bytes,
        "bytes_converted": job.bytes_done, "gbps": round(job.bytes_done / seconds / 1e9, 4),
        "layers_per_s": round(bar.layers_done / seconds, 4), "device": str(device),
        "shards_written": len(groups) - len(done), "shards_skipped": len(done)}}


__all__ = ["convert", "format_summary"]
