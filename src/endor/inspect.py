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
                stored = sum(end - start for start, end in f.byte_ranges(name))
                numel = math.prod(shape)
            else:
                st = f.header.tensors[name]
                shape, numel, nnz = list(st.shape), math.prod(st.shape), None
                dtype = SAFETENSORS_DTYPES[st.dtype]  # torch's names for every row, not "BF16"
                stored, codec = st.end - st.start, None
            if verify:
                f.get_tensor(name)  # checks the checksum (and rules 5-6, decoding)
            itemsize = stored // numel if nnz is None and numel else getattr(dtype, "itemsize", 0)
            rows.append({"file": Path(path).name, "name": name, "shape": list(shape),
                         "dtype": str(dtype).replace("torch.", ""), "compressed": nnz is not None,
                         "sparsity": (1 - nnz / numel) if nnz is not None and numel else None,
                         "numel": numel, "values_codec": codec,
                         "bits_per_element": 8 * stored / numel if numel else None,
                         "checksum": nnz is not None or f.dense_checksum(name) is not None,
                         "stored_bytes": stored, "dense_bytes": numel * itemsize})
    return rows


def describe(path, *, verify: bool = False) -> list[dict]:
    """Rows for a file, or for every shard of a checkpoint directory."""
    path = Path(path)
    if path.is_dir():
        ck = Checkpoint(path)
        return [row for s in ck.shards for row in describe_file(path / s.file, verify=verify)]
    return describe_file(path, verify=verify)
