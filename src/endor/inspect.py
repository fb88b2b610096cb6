"""Describe an Endor file or converted checkpoint: tensors, sparsity, stored vs dense bytes, and
(optionally) a full verification that every tensor decompresses under the format's rules."""

from __future__ import annotations

import math
from pathlib import Path

from .checkpoint import Checkpoint
from .format import EndorFile
from .format.spec import SAFETENSORS_DTYPES


def describe_file(path, *, verify: bool = False) -> list[dict]:
    rows = []
    with EndorFile(path) as f:
        for name in f.keys():
            if f.is_compressed(name):
                entry = f.entry(name)
                shape, dtype, nnz, codec = entry.shape, entry.dtype, entry.nnz, entry.codec
                group_size = entry.params.get("group_size")
                stored = sum(end - start for start, end in f.byte_ranges(name))
                numel = math.prod(shape)
            else:
                st = f.header.tensors[name]
                shape, numel, nnz = list(st.shape), math.prod(st.shape), None
                dtype = SAFETENSORS_DTYPES[st.dtype]  # torch's names for every row, not "BF16"
                stored, codec, group_size = st.end - st.start, None, None
            if verify:
                f.get_tensor(name)  # checks the checksum (and rules 5-6, decoding)
            itemsize = stored // numel if nnz is None and numel else getattr(dtype, "itemsize", 0)
            rows.append({"file": Path(path).name, "name": name, "shape": list(shape),
                         "dtype": str(dtype).replace("torch.", ""), "compressed": nnz is not None,
                         "sparsity": (1 - nnz / numel) if nnz is not None and numel else None,
                         "numel": numel, "values_codec": codec, "group_size": group_size,
                         "bits_per_element": 8 * stored / numel if numel else None,
                         "checksum": nnz is not None or f.dense_checksum(name) is not None,
                         "stored_bytes": stored, "dense_bytes": numel * itemsize})
    return rows


def quantization_note(path) -> dict | None:
    """For a checkpoint converted with int8/int4 values: {"values", "group_size",
    "quantization", "error"} from its manifest (None otherwise, and for single files)."""
    path = Path(path)
    if not path.is_dir():
        return None
    from .checkpoint import Checkpoint
    manifest = Checkpoint(path).manifest
    quantization = manifest.get("quantization")
    if not isinstance(quantization, dict):
        return None
    return {"values": manifest.get("values"), "group_size": quantization.get("group_size"),
            "quantization": quantization.get("rounding"),
            "error": (manifest.get("summary") or {}).get("quantization_error")}


def describe(path, *, verify: bool = False) -> list[dict]:
    """Rows for a file, or for every shard of a checkpoint directory."""
    path = Path(path)
    if path.is_dir():
        ck = Checkpoint(path)
        return [row for s in ck.shards for row in describe_file(path / s.file, verify=verify)]
    return describe_file(path, verify=verify)


def budgets(path) -> dict | None:
    """What `max_memory` a converted checkpoint can run in (None for a single file), from its
    headers: with the non-layer weights ("rest" shard, dense) resident and every decoder layer
    streamed, and what keeps every layer resident with dense compute and with fused compute
    (decoder weights held compressed). Below the non-layer weights the runtime reads embedding
    rows on demand and streams the LM head: that smallest budget needs the model's structure,
    endor.runtime.budget.least_budget. Streaming buffers come on top: prefetch+1 read slots of
    at least the largest layer shard."""
    path = Path(path)
    if not path.is_dir():
        return None
    rows = describe(path)
    shards = {s.file: s.group for s in Checkpoint(path).shards}
    by_group: dict[str, list[dict]] = {}
    for r in rows:
        by_group.setdefault(shards[r["file"]], []).append(r)
    rest = sum(r["dense_bytes"] for r in by_group.get("rest", []))
    layers = [g for g in by_group if g != "rest"]
    return {
        "rest_resident_bytes": rest,
        "largest_layer_shard_bytes": max(
            (sum(r["stored_bytes"] for r in by_group[g]) for g in layers), default=0),
        "all_resident_dense_bytes": rest + sum(r["dense_bytes"] for g in layers
                                               for r in by_group[g]),
        "all_resident_fused_bytes": rest + sum(
            r["stored_bytes"] if r["compressed"] else r["dense_bytes"]
            for g in layers for r in by_group[g]),
    }
