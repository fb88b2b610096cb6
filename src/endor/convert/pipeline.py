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
"""

from __future__ import annotations

import ctypes
import fnmatch
import hashlib
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

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
from ..prune import check_settings, needs_calibration, needs_hessian, prune_weight
from . import calibrate, outdir
from .endor_source import open_source
from .structure import ModelLayout, build_layout, load_config
from .summary import format_summary, shard_metadata, summarize

DEFAULT_VALUES = "exp"  # value codec of the Endor tensors written (docs/FORMAT.md 1.1)

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


def _set_params(model: nn.Module, tensors: dict) -> None:
    """Point parameters at `tensors` (or at meta tensors, to free them), without copying."""
    for name, t in tensors.items():
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._parameters[attr] = nn.Parameter(t, requires_grad=False)


class _Conversion:
    def __init__(self, source, layout: ModelLayout, writer: CheckpointWriter, settings: dict,
                 sparse: set, *, verify: bool, progress):
        self.source, self.layout, self.writer = source, layout, writer
        self.settings, self.sparse, self.verify, self.progress = settings, sparse, verify, progress
        self.groups = {s.group: i for i, s in enumerate(writer.shards)}
        self.names = {s.group: [] for s in writer.shards}
        for name in source.names():
            i = layout.layer_of(name)
            self.names[REST if i is None else f"layers.{i}"].append(name)
        self.nnz: dict[str, int] = {}
        self.bytes_done, self.t0 = 0, time.perf_counter()

    # -- one shard -----------------------------------------------------------------------
    def _encode(self, name: str, t: torch.Tensor):
        """What shard files hold for `name`: an EndorTensor for a pruned Linear weight of an
        Endor checkpoint (checked to decompress back to `t` when verifying), else `t` itself."""
        if name not in self.sparse or self.writer.weights != "endor":
            if name in self.layout.linear_weights:
                self.nnz[name] = _count_nonzero(t)
            return t
        et = compress(t, values=self.settings["values"])
        self.nnz[name] = et.nnz
        if self.verify and not bit_equal(decompress(et), t):
            raise FormatError("verification failed: the compressed tensor does not decompress to "
                              "the pruned weight (encoder fault)", tensor=name)
        return et

    def _finish_shard(self, group: str, stored: dict) -> None:
        """Write the shard of `group` ({name: tensor or EndorTensor}), then read it back."""
        i = self.groups[group]
        nnz = {n: self.nnz.pop(n) for n in stored if n in self.nnz}
        path = self.writer.write(i, stored, shard_metadata(self.settings, nnz),
                                 order=_expert_order(stored))
        if self.verify:
            outdir.verify_shard(path, stored)
        stored.clear()
        _return_free_memory()
        self.bytes_done += sum(self.source.nbytes(n) for n in self.names[group])
        rate = self.bytes_done / (time.perf_counter() - self.t0)
        self.progress.set_postfix_str(f"{rate / 1e9:.2f} GB/s" if rate >= 1e8 else
                                      f"{rate / 1e6:.1f} MB/s", refresh=False)
        self.progress.update(1)

    def _prune(self, name: str, weight: torch.Tensor, stats=None, method=None) -> torch.Tensor:
        s = self.settings
        try:
            return prune_weight(weight, method=method or s["method"],
                                sparsity=s["sparsity"] or 0.0,
                                nm=None if s["nm"] is None else tuple(s["nm"]), stats=stats)
        except (ValueError, TypeError) as e:
            raise type(e)(f"{name}: {e}") from None

    def rest(self) -> None:
        tensors = {name: self.source.read(name) for name in self.names[REST]}
        for target, origin in self.layout.tied.items():
            # transformers ties these on load (and only if equal): storing both would duplicate
            if target in tensors and origin in tensors and \
                    bit_equal(tensors[target], tensors[origin]):
                del tensors[target]
        self._finish_shard(REST, tensors)

    def streamed_layers(self, todo: list[int]) -> None:
        """One tensor at a time: read, prune, compress; only the compressed layer is held."""
        with _one_torch_thread():
            for i in todo:
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
        layout, model = self.layout, self.layout.model
        layers = model.get_submodule(layout.layers_prefix)
        hidden, calls = self._layer_inputs(tokens, layers)
        for i in range(max(todo) + 1):
            group, layer = f"layers.{i}", layers[i]
            params = {f"{layout.layers_prefix}.{i}.{n}": p for n, p in layer.named_parameters()}
            if i in todo:
                originals = {name: self.source.read(name) for name in self.names[group]}
                as_model = self._fused(i, originals)
                missing = sorted(set(params) - set(as_model))
                if missing:
                    raise FormatError(f"the source lacks {', '.join(missing)}, needed to run "
                                      f"layer {i} on the calibration data", path=self.source.path)
                _set_params(model, {n: as_model[n].float() for n in params})
                del as_model
                targets = {n: model.get_submodule(n.removesuffix(".weight"))
                           for n in self.names[group]
                           if n in self.sparse and not self.layout.is_expert_weight(n)}
                stats = calibrate.collect_stats(layer, calls[i], hidden, targets, hessian=hessian)
                # Experts have no module to hook (transformers fuses them): magnitude, recorded
                # in endor.json as "expert_pruning".
                final = {n: self._prune(n, t, stats.get(n)) if n in targets else
                         self._prune(n, t, method="magnitude") if n in self.sparse else t
                         for n, t in originals.items()}
                del stats, originals
                self._finish_shard(group, {n: self._encode(n, t) for n, t in final.items()})
            else:
                # Already in OUT: its pruned weights, read back, give the next layer's inputs.
                final = load_file(self.writer.path(self.groups[group]))
            if i < max(todo):
                final = self._fused(i, final)
                _set_params(model, {n: final[n].float() for n in params})
                hidden = calibrate.propagate(layer, calls[i], hidden)
            _set_params(model, {n: torch.empty_like(p, device="meta") for n, p in params.items()})
            del final

    def _layer_inputs(self, tokens: torch.Tensor, layers: nn.ModuleList):
        """Load the parameters outside the decoder layers (embeddings...) and run them."""
        model, source = self.layout.model, self.source
        head = model.get_output_embeddings()
        head_params = {id(p) for p in head.parameters()} if head is not None else set()
        head_params -= {id(p) for p in model.get_input_embeddings().parameters()}  # if tied
        outside = {n: p for n, p in model.named_parameters()
                   if self.layout.layer_of(n) is None and id(p) not in head_params}
        loaded = {}
        for name in outside:
            origin = name if name in source else self.layout.tied.get(name)
            if origin is None or origin not in source:
                # a tied embedding stored under the head's name only
                origin = next((t for t, o in self.layout.tied.items() if o == name), None)
            if origin is None or origin not in source:
                raise FormatError(f"the source lacks {name}, needed to compute calibration "
                                  "activations", path=source.path)
            loaded[name] = source.read(origin).float()
        _set_params(model, loaded)
        try:
            return calibrate.capture_inputs(model, layers, tokens)
        finally:
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
              seqlen, values):
    calibration = None
    if needs_calibration(method):
        calibration = {"text_sha256": hashlib.sha256(calib_text.encode()).hexdigest(),
                       "samples": samples, "seqlen": seqlen, "dtype": "float32"}
    settings = {"method": method, "sparsity": None if method == "none" else float(sparsity),
                "nm": None if nm is None else list(nm), "weights": weights,
                "values": values if weights == "endor" else None,
                "dense_patterns": sorted(patterns), "calibration": calibration,
                "source": source.fingerprint()}
    if layout.moe_layers and method != "none":
        # Each expert is pruned alone; calibrated methods hook nn.Linear inputs, and experts
        # are fused parameters with no module of their own.
        settings["expert_pruning"] = "magnitude" if needs_calibration(method) else method
    prior = source.prior_pruning()
    if prior is not None:  # an Endor checkpoint: how its weights were pruned already
        settings["prior_pruning"] = prior
    return settings


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
            calib_seqlen: int = calibrate.DEFAULT_SEQLEN, values: str = DEFAULT_VALUES) -> dict:
    """Prune (method "none" keeps the weights as they are) and compress the model `src` into
    the checkpoint directory `out`. Returns the summary (also stored in `out/endor.json`) plus a
    "run" entry with this run's timing. See docs/FORMAT.md section 2 for the layout.

    `src` is an HF model directory, a .gguf file or alias (see resolve_source), or an Endor
    checkpoint directory, read decompressed: `convert(A, B, method="none", weights="dense")`
    makes the dense twin of the pruned checkpoint A without pruning again (B's manifest lists
    A's pruning under "prior_pruning"). `values` is the value codec of the Endor tensors
    ("exp" or "raw", docs/FORMAT.md section 1.1)."""
    method, sparsity, nm = check_settings(method, sparsity, nm)
    if weights not in WEIGHT_KINDS:
        raise ValueError(f"weights must be one of {WEIGHT_KINDS}, got {weights!r}")
    if values not in codec_names():
        raise ValueError(f"values must be one of {codec_names()}, got {values!r}")
    if needs_calibration(method) and calib_text is None:
        calib_text = calibration_text()
    patterns = list(dense_patterns or [])
    src_dir = resolve_source(src)
    out = Path(out)
    outdir.check_out(out, src_dir)
    source = open_source(src_dir)
    layout = build_layout(load_config(src_dir))
    sparse = _sparse_names(source, layout, patterns)
    settings = _settings(source, layout, method, sparsity, nm, weights, patterns,
                         calib_text or "", calib_samples, calib_seqlen, values)

    groups = [f"layers.{i}" for i in range(layout.num_layers)] + [REST]
    with outdir.replacing(out, replace=not resume) as work:
        writer = CheckpointWriter(work, groups, weights=weights)
        done = outdir.prepare(writer, settings, resume=resume)
        outdir.copy_side_files(src_dir, work)
        bar = tqdm(total=len(groups), initial=len(done), unit="shard", desc="endor convert",
                   disable=not progress)
        job = _Conversion(source, layout, writer, settings, sparse, verify=verify, progress=bar)
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
        "shards_written": len(groups) - len(done), "shards_skipped": len(done)}}


__all__ = ["convert", "format_summary"]
