"""Random-weight HF checkpoints of any size, for benchmarks of conversion and of the runtime.

`write_synthetic_checkpoint(out_dir, LlamaConfig(...))` writes config.json, safetensors shards
(HF naming, at most `max_shard_bytes` each) and the standard index, one shard at a time, so memory
stays at about one shard whatever the model size. Weights are deterministic per (seed, tensor
name): normal with the config's initializer_range, norm weights 1 (no tokenizer is written)."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from .structure import build_layout

from ..format.io import chmod_as_created

DEFAULT_MAX_SHARD_BYTES = 512 * 2**20


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _random_tensor(name: str, shape, dtype, std: float, seed: int) -> torch.Tensor:
    if len(shape) == 1 and "norm" in name:
        return torch.ones(shape, dtype=dtype)
    t = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=_generator(seed, name))
    return t.to(dtype)


def parameter_shapes(config) -> dict:
    """{name: shape} of the model `config` describes, as save_pretrained would store it (tied
    copies left out), without allocating any weight."""
    layout = build_layout(config)
    shapes = {n: tuple(p.shape) for n, p in layout.model.named_parameters()}
    for target, origin in layout.tied.items():
        if origin in shapes:
            shapes.pop(target, None)
    return _per_expert(shapes)


def _per_expert(shapes: dict) -> dict:
    """Fused expert parameters as checkpoints store them: one 2-D tensor per expert and
    projection, Qwen-MoE names (`<block>.experts.<e>.gate_proj.weight`; see endor.moe)."""
    out = {}
    for name, shape in shapes.items():
        if name.endswith(".experts.gate_up_proj") and len(shape) == 3:
            module = name.rpartition(".")[0]
            for e in range(shape[0]):
                out[f"{module}.{e}.gate_proj.weight"] = (shape[1] // 2, shape[2])
                out[f"{module}.{e}.up_proj.weight"] = (shape[1] // 2, shape[2])
        elif name.endswith(".experts.down_proj") and len(shape) == 3:
            module = name.rpartition(".")[0]
            for e in range(shape[0]):
                out[f"{module}.{e}.down_proj.weight"] = tuple(shape[1:])
        else:
            out[name] = shape
    return out


def write_synthetic_checkpoint(out_dir, config, *, seed: int = 0,
                               dtype: torch.dtype = torch.float16,
                               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Write a random-weight checkpoint of `config` (e.g. a LlamaConfig) to `out_dir`."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shapes = parameter_shapes(config)
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    std = float(getattr(config, "initializer_range", 0.02))
    weight_map, total = {}, 0
    for k, names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {n: _random_tensor(n, shapes[n], dtype, std, seed) for n in names}
        tmp = out / (file + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        chmod_as_created(tmp)
        os.replace(tmp, out / file)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({n: file for n in names})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    config = copy.deepcopy(config)
    config.dtype = dtype  # from_pretrained then loads the weights in the dtype they are stored in
    config.save_pretrained(out)
    return out
