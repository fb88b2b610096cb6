"""The baseline users have today: HF Accelerate offloading of the same pruned model, stored dense.

A checkpoint converted with weights "dense" is a plain HF directory (config.json, safetensors
shards, index), so `transformers.from_pretrained` loads it with a `device_map` that puts the
streamed decoder layers on "disk" (or "cpu"). What then streams from disk: transformers builds
an offload index that points at the checkpoint's own safetensors shards (nothing is copied to
`offload_folder`); on every forward Accelerate's AlignDevicesHook opens the shard with
safetensors' `safe_open` (an mmap, so reads go through the page cache) and copies each weight
with `get_tensor` into a fresh tensor, synchronously, layer after layer, with no prefetch; after
the layer it drops them. Cold numbers therefore need the page cache evicted (`evict`), before
each run, or before each layer's read to model a checkpoint larger than RAM (`evict_on_read`).
Mixture-of-experts checkpoints are the exception: transformers fuses their per-expert tensors
into `[E, ...]` parameters while loading and writes the fused ones into `offload_folder` (3.3 GB
of the 3.7 GB e2e MoE model), so those files are evicted too (`endor_offloaded`), and removed by
`endor_close` when the folder was a temporary one.

The same budget rule as load_model keeps the same first layers resident."""

from __future__ import annotations

import contextlib
import logging as std_logging
import re
import shutil
import tempfile
from pathlib import Path

import torch

from ..checkpoint import Checkpoint
from ..runtime.metrics import Metrics
from ..runtime.model import check_device, install_metric_hooks
from ..runtime.plan import parse_size, plan_memory, stored_nbytes
from ..runtime.reader import evict_page_cache
from ..runtime.weights import layer_files


def _layer_path(names: list[str], index: int, file) -> str:
    m = re.match(rf"^(.*)\.{index}\.", names[0]) if names else None
    if m is None or not all(n.startswith(f"{m.group(1)}.{index}.") for n in names):
        raise ValueError(f"cannot tell which module holds decoder layer {index} from the tensor "
                         f"names of {file}")
    return m.group(1)


def _tensor_modules(path) -> list[str]:
    """The modules owning a parameter or buffer in the model config.json describes."""
    # lazy: heavy (transformers/accelerate), kept out of `import endor` and `endor --help`
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    names = [n for n, _ in model.named_parameters(remove_duplicate=False)] + \
        [n for n, _ in model.named_buffers(remove_duplicate=False)]
    return list(dict.fromkeys(n.rpartition(".")[0] for n in names))


@contextlib.contextmanager
def _quiet_transformers():
    """No progress bar or "parameters are on the meta device" notice while loading."""
    # lazy: heavy (transformers/accelerate), kept out of `import endor` and `endor --help`
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    accelerate_log = std_logging.getLogger("accelerate.big_modeling")
    accelerate_level = accelerate_log.level
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    accelerate_log.setLevel(std_logging.ERROR)
    try:
        yield
    finally:
        accelerate_log.setLevel(accelerate_level)
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def load_accelerate(path, *, device="cpu", offload: str = "disk", max_memory=None,
                    offload_folder=None, compute_threads: int | None = None):
    """The dense checkpoint at `path`, offloaded by HF Accelerate: the first layers that fit in
    `max_memory` (after the non-layer weights) on `device`, the others on `offload`.

    Returns the transformers model with endor_stats() (the same metrics as load_model: prefill
    time, decode tokens/s), endor_files (the shards Accelerate reads each forward) and
    endor_close(). compute_threads: torch threads during each forward (default: unchanged)."""
    # lazy: heavy (transformers/accelerate), kept out of `import endor` and `endor --help`
    from transformers import AutoModelForCausalLM

    device = check_device(device)
    if offload not in ("disk", "cpu"):
        raise ValueError(f"offload must be 'disk' or 'cpu', got {offload!r}")
    if offload == "cpu" and device.type == "cpu":
        raise ValueError("offload='cpu' with device='cpu' offloads nothing; use offload='disk' "
                         "or device='cuda'")
    ckpt = Checkpoint(path)
    if ckpt.weights != "dense":
        raise ValueError(f"{path} stores weights {ckpt.weights!r}; Accelerate reads only dense "
                         "checkpoints (convert with --weights dense)")
    files, rest = layer_files(ckpt)
    rest_bytes = sum(stored_nbytes(rest, n) for n in rest.keys())
    layer_bytes = [sum(stored_nbytes(f, n) for n in f.keys()) for f in files]
    memory = plan_memory(parse_size(max_memory, device=str(device)), rest_bytes, layer_bytes)
    target = str(device) if device.type == "cpu" else device.index
    layers = [f"{_layer_path(f.keys(), i, f.path)}.{i}" for i, f in enumerate(files)]
    device_map = {name: target for name in _tensor_modules(ckpt.path)
                  if not any(name.startswith(layer + ".") for layer in layers)}
    for i, layer in enumerate(layers):
        device_map[layer] = target if i in memory.resident else offload
    folder = offload_folder or tempfile.mkdtemp(prefix="endor-accelerate-")
    with _quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(ckpt.path, device_map=device_map,
                                                     offload_folder=folder, dtype="auto")
    model.eval()
    metrics = Metrics()
    install_metric_hooks(model, metrics, compute_threads, device)
    streamed = [files[i].path for i in memory.streamed]

    def endor_stats() -> dict:
        return {"path": str(ckpt.path), "weights": "dense", "device": str(device),
                "offload": offload, "runtime": "accelerate", **metrics.summary(),
                "compute_threads": compute_threads or torch.get_num_threads(),
                "layers": len(files), "resident_layers": list(memory.resident),
                "streamed_layers": list(memory.streamed), "budget_bytes": memory.budget,
                "resident_bytes": memory.resident_bytes,
                "streamed_shard_bytes": sum(Path(p).stat().st_size for p in streamed)}

    # decoder layer -> the files Accelerate reads it from in offload_folder (fused MoE experts)
    offloaded = {i: sorted(str(p) for p in Path(folder).glob(f"{layers[i]}.*"))
                 for i in memory.streamed}

    def endor_close() -> None:
        if offload_folder is None:
            shutil.rmtree(folder, ignore_errors=True)

    model.endor_stats = endor_stats
    model.endor_reset_stats = metrics.reset
    model.endor_files = streamed
    model.endor_offloaded = offloaded
    model.endor_close = endor_close
    model.endor_memory_plan = memory
    return model


def evict_on_read(model) -> None:
    """Before each offloaded layer runs (and Accelerate reads its weights), drop its shard from
    the page cache: every read is cold, as with a checkpoint larger than RAM."""
    files = {Path(p) for p in model.endor_files}
    ckpt_layers = model.endor_memory_plan.streamed
    layer_list = None
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == len(
                model.endor_memory_plan.layer_bytes):
            layer_list = module
            break
    assert layer_list is not None and len(files) == len(ckpt_layers)
    for i, path in zip(ckpt_layers, model.endor_files):
        paths = [path, *model.endor_offloaded.get(i, ())]
        layer_list[i].register_forward_pre_hook(
            lambda m, a, paths=paths: [evict_page_cache(p) for p in paths] and None)
