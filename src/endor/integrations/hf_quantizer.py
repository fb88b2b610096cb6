"""`AutoModelForCausalLM.from_pretrained(endor_checkpoint, ...)` after `import endor`.

An "endor"-weights checkpoint's config.json carries `"quantization_config": {"quant_method":
"endor"}` (written by CheckpointWriter.finish). This module registers a QuantizationConfig and an
HfQuantizer for it with transformers (lazy_hook calls `register` once transformers' quantizers
load). Two ways to load, decided from the budget transformers hands the quantizer:

* the model fits (no device_map, a single-device device_map, or device_map="auto" with a
  max_memory that holds the dense model): transformers loads it, every Endor tensor decompressed
  by a WeightConverter op (its parts in, the dense weight out): the in-memory model.
* it does not fit: the quantizer hides the model's state dict from transformers' own loading
  (nothing is read or allocated for it) and afterwards makes the very model object transformers
  returns the offloaded runtime's model (`endor.load_model(path, model=it, ...)`: as many
  decoder layers resident as the budget holds, the others streamed), with endor_stats() etc.

The budget is the compute device's max_memory entry: the first GPU given one, else "cpu".
Several devices in one device_map are refused: the runtime computes on one device.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
from transformers.quantizers.auto import (AUTO_QUANTIZATION_CONFIG_MAPPING,
                                          AUTO_QUANTIZER_MAPPING, register_quantization_config,
                                          register_quantizer)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..checkpoint import CHECKPOINT_VERSION, HF_GUARD_FILE, HF_QUANT_METHOD, Checkpoint
from ..errors import FormatError
from ..format import spec
from ..format.io import check_compressed, endor_tensor

_OFF_DEVICE = ("cpu", "disk")


class EndorConfig(QuantizationConfigMixin):
    """The `quantization_config` of an Endor checkpoint. There is nothing to choose: conversion
    (pruning, compression) is `endor convert`'s job, so this only identifies the format."""

    def __init__(self, checkpoint_version: int = CHECKPOINT_VERSION, **kwargs):
        self.quant_method = HF_QUANT_METHOD
        self.checkpoint_version = checkpoint_version


def _device_of(key) -> torch.device:
    """A max_memory / device_map key or value as a torch device (ints are CUDA indices)."""
    if isinstance(key, int):
        return torch.device("cuda", key)
    return torch.device(key)


class EndorHfQuantizer(HfQuantizer):
    requires_calibration = True  # pre-quantized only: `endor convert` makes Endor checkpoints
    serialized_names = {"weight": list(spec.part_names("weight"))}  # per checkpoint: below

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.checkpoint: Checkpoint | None = None
        self.offload: dict | None = None  # set when the runtime takes over: device, budget
        self._hide_handle = None

    # -- before loading -------------------------------------------------------------------
    def validate_environment(self, device_map=None, **kwargs):
        version = getattr(self.quantization_config, "checkpoint_version", None)
        if version != CHECKPOINT_VERSION:
            raise FormatError(f"checkpoint version {version!r} is not supported (this endor "
                              f"reads {CHECKPOINT_VERSION}); upgrade endor")
        if isinstance(device_map, dict):
            devices = {str(_device_of(d)) if d not in _OFF_DEVICE else d
                       for d in device_map.values()}
            if len(devices) > 1 or devices & set(_OFF_DEVICE) - {"cpu"}:
                raise ValueError(
                    "an Endor checkpoint loads on one device (got device_map over "
                    f"{sorted(devices)}); for a memory budget pass device_map='auto' with "
                    "max_memory={'cpu': '2GB'} (or {0: '8GB'} for a GPU): what does not fit "
                    "streams from disk")

    def update_attn_implementation(self, config):
        # The one hook that sees the config before transformers looks for weight files: drop the
        # guard that makes loading without endor fail (checkpoint.HF_GUARD_FILE).
        if getattr(config, "transformers_weights", None) == HF_GUARD_FILE:
            del config.transformers_weights
        return config

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if not checkpoint_files:
            raise ValueError("an Endor checkpoint loads from its directory of shards")
        self.checkpoint = Checkpoint(Path(checkpoint_files[0]).parent)  # every header checked
        self.model = model
        # The parts one Endor tensor may be stored as: bitmap, tiles and its value codec's own
        # (format v2), gathered from the headers; the WeightConverter collects any of them.
        suffixes = {s for name in self.checkpoint.weight_map
                    if (f := self.checkpoint.file_of(name)).is_compressed(name)
                    for s in f.part_suffixes(name)}
        self.serialized_names = {"weight": [spec.part_name("weight", s)
                                            for s in sorted(suffixes)]}

        def hide(module, state_dict, prefix, local_metadata):
            if self.offload is not None:
                state_dict.clear()

        self._hide_handle = model.register_state_dict_post_hook(hide)
        return model

    def adjust_max_memory(self, max_memory: dict) -> dict:
        """Called with the budget of device_map="auto": decide who loads. The map transformers
        then infers puts the whole model on the compute device either way (in offload mode its
        meta parameters cost nothing; the runtime holds to the budget)."""
        gpus = [k for k, v in max_memory.items() if k not in _OFF_DEVICE and v]
        key = gpus[0] if gpus else "cpu"
        device, budget = _device_of(key), int(max_memory.get(key) or 0)
        needed = self._dense_bytes()
        if needed > budget:
            if self.model.dtype != self._stored_dtype():
                raise ValueError(f"streaming from disk runs in the checkpoint's dtype "
                                 f"({self._stored_dtype()}); drop dtype={self.model.dtype}")
            # On a GPU, streamed layers wait in host RAM (compressed) when all shards fit in
            # the "cpu" budget (transformers fills it with the free RAM when not given), else
            # they are read from disk; on the CPU the budget is RAM itself: disk.
            shards = sum((self.checkpoint.path / s.file).stat().st_size
                         for s in self.checkpoint.shards)
            host = int(max_memory.get("cpu") or 0)
            offload = "cpu" if device.type == "cuda" and shards <= host else "disk"
            self.offload = {"device": device, "max_memory": budget, "offload": offload}
            # Every checkpoint key is "unexpected" to the hidden state dict: expected here.
            self.model._keys_to_ignore_on_load_unexpected = {r"."}
        return {key: max(needed, budget) * 2 + 2**30}

    def _dense_bytes(self) -> int:
        """Bytes of every stored tensor once dense (the tied LM head, not stored, is shared)."""
        total = 0
        for name in self.checkpoint.weight_map:
            f = self.checkpoint.file_of(name)
            if f.is_compressed(name):
                shape, dtype = f.entry(name)[:2]
                total += dtype.itemsize * math.prod(shape)
            else:
                stored = f.header.tensors[name]
                total += stored.end - stored.start
        return total

    def _stored_dtype(self) -> torch.dtype:
        from ..runtime.weights import layer_files, model_dtype
        files, rest = layer_files(self.checkpoint)
        return model_dtype([rest, *files[:1]])

    def get_load_operations(self) -> dict:
        op = _decompress_op()
        return {"deserialize": op, "dequantize": op}

    def file(self, name: str):
        """The shard (EndorFile) holding Endor tensor `name`."""
        try:
            f = self.checkpoint.file_of(name)
            f.entry(name)
            return f
        except (KeyError, FormatError):
            raise FormatError("is not an Endor tensor of this checkpoint", tensor=name,
                              path=self.checkpoint.path) from None

    # -- after loading --------------------------------------------------------------------
    def _process_model_after_weight_loading(self, model, **kwargs):
        if self._hide_handle is not None:
            self._hide_handle.remove()
        self.model = None
        path = self.checkpoint.path
        for f in self.checkpoint._files.values():  # the model keeps this quantizer: no fds
            f.close()
        self.checkpoint = None
        if self.offload is not None:
            del model._keys_to_ignore_on_load_unexpected  # back to the class's own list
            from ..runtime import load_model
            load_model(path, model=model, **self.offload)
        return model

    def is_serializable(self):
        return False  # save an Endor model with `endor convert`/`endor export`, not save_pretrained

    @property
    def is_trainable(self):
        return False


@functools.cache
def _decompress_op():
    """The ConversionOps subclass, built on first use: transformers.core_model_loading imports
    modeling code that is still importing while this module registers (lazy_hook)."""
    from transformers.core_model_loading import ConversionOps

    class EndorDecompress(ConversionOps):
        """The parts of one Endor tensor in, its dense weight out, checked (rules 5 and 7
        before, rule 6 while decompressing) and cast to the dtype the model asked for."""

        def __init__(self, hf_quantizer):
            self.hf_quantizer = hf_quantizer

        def __deepcopy__(self, memo):  # transformers copies converters per weight: share ours
            return type(self)(self.hf_quantizer)

        def convert(self, input_dict, full_layer_name=None, model=None, **kwargs):
            from ..kernels import decompress

            f = self.hf_quantizer.file(full_layer_name)
            parts = {pattern.rpartition(spec.PART_MARKER)[2]: tensors[0]
                     for pattern, tensors in input_dict.items()}
            missing = set(f.part_suffixes(full_layer_name)) - set(parts)
            if missing:
                raise FormatError(f"parts {sorted(missing)} did not reach the loader",
                                  path=f.path, tensor=full_layer_name)
            et = check_compressed(endor_tensor(f.entry(full_layer_name), parts, f.version or 1),
                                  name=full_layer_name, path=f.path)
            dense = decompress(et, device=parts["bitmap"].device)
            target = model.get_parameter(full_layer_name).dtype
            return {full_layer_name: dense.to(target) if dense.dtype != target else dense}

    return EndorDecompress


def register() -> None:
    """Make transformers know quant_method "endor" (idempotent)."""
    if HF_QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(HF_QUANT_METHOD)(EndorConfig)
    if HF_QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(HF_QUANT_METHOD)(EndorHfQuantizer)
