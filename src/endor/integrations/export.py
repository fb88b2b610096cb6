"""`endor export SRC DEST --format hf`: an Endor checkpoint as a plain HF checkpoint, for the
serving engines (vLLM, TGI, SGLang all removed or never had sparse-weight loading, so a dense
checkpoint is the way in). Every tensor decompressed bit-exactly in its stored dtype, written in
shards of at most `max_shard_size` bytes with the standard names and index, config.json without
Endor's quantization_config, and the tokenizer and generation files copied. Memory holds one
output shard at a time."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from ..checkpoint import INDEX, Checkpoint, mark_hf_config, shard_name
from ..convert.outdir import copy_side_files
from ..runtime.plan import parse_size

FORMATS = ("hf",)
DEFAULT_MAX_SHARD = "5GB"  # transformers' save_pretrained default


def _plan_shards(ckpt: Checkpoint, max_bytes: int) -> list[list[str]]:
    """Tensor names per output shard: source shards kept whole and in order (a layer never
    splits), packed until the next would pass `max_bytes` (one larger shard stays alone)."""
    groups, current, size = [], [], 0
    for shard in ckpt.shards:
        f = ckpt.open(shard.file)
        names = f.keys()
        nbytes = sum(_dense_nbytes(f, n) for n in names)
        if current and size + nbytes > max_bytes:
            groups.append(current)
            current, size = [], 0
        current.extend(names)
        size += nbytes
    if current:
        groups.append(current)
    return groups


def _dense_nbytes(f, name: str) -> int:
    if f.is_compressed(name):
        shape, dtype = f.entry(name)[:2]
        return math.prod(shape) * dtype.itemsize
    stored = f.header.tensors[name]
    return stored.end - stored.start


def export_hf(src, dest, *, max_shard_size=DEFAULT_MAX_SHARD, overwrite: bool = False) -> dict:
    """Write the plain HF checkpoint of Endor checkpoint `src` into `dest`. Returns a summary
    {"dest", "shards", "tensors", "bytes"}."""
    from safetensors.torch import save_file

    ckpt = Checkpoint(src)
    dest = Path(dest)
    if dest.resolve() == ckpt.path.resolve():
        raise ValueError("DEST must differ from SRC")
    if dest.exists() and any(dest.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{dest} is not empty; choose another directory or pass "
                                  "--overwrite")
        shutil.rmtree(dest)
    max_bytes = parse_size(max_shard_size)
    if not max_bytes or max_bytes <= 0:
        raise ValueError(f"max_shard_size must be a positive size, got {max_shard_size!r}")
    dest.mkdir(parents=True, exist_ok=True)
    copy_side_files(ckpt.path, dest)
    mark_hf_config(dest, "dense")  # drops quantization_config and the guard

    groups = _plan_shards(ckpt, max_bytes)
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        file = shard_name(i, len(groups))
        tensors = {n: ckpt.file_of(n).get_tensor(n).contiguous() for n in names}
        tmp = dest / (file + ".tmp")
        save_file(tensors, tmp, metadata={"format": "pt"})
        os.replace(tmp, dest / file)
        for n, t in tensors.items():
            weight_map[n] = file
            total += t.numel() * t.element_size()
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    tmp = dest / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, dest / INDEX)
    return {"dest": str(dest), "shards": len(groups), "tensors": len(weight_map), "bytes": total}
