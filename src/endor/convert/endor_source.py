"""An Endor checkpoint directory (docs/FORMAT.md section 2) as a conversion source: the same
interface as source.SourceCheckpoint, every tensor dense on read.

    convert(hf_dir, A, method="wanda", weights="endor")   # prune once
    convert(A, B, method="none", weights="dense")         # the dense twin, not pruned again

An Endor tensor is read one at a time: its parts with positioned reads (no mmap, so RSS
does not grow with the model), rules 5 and 7 checked (tile index, checksum), then decompressed
(the decompressor checks rule 6). The manifest's pruning settings carry over as `prior_pruning`, so
the converted checkpoint still says how its weights were pruned."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import MANIFEST, Checkpoint
from ..errors import FormatError
from ..format import spec
from ..format.header import StoredTensor
from ..format.io import check_compressed, check_dense, endor_tensor
from ..format.spec import SAFETENSORS_DTYPES
from ..kernels import decompress
from .ct_source import CompressedTensorsSource, compressed_tensors_config
from .source import SourceCheckpoint, fingerprint, read_stored

_PRUNING_KEYS = ("method", "sparsity", "nm", "calibration")


@dataclass(frozen=True)
class _Entry:
    file: str
    shape: tuple
    dtype: torch.dtype
    parts: tuple  # StoredTensor of the dense tensor, or of an Endor tensor's parts
    checksum: str | None  # None for a dense tensor of a file without stored checksums
    entry: object = None  # an Endor tensor's metadata entry (format.validate.Entry)
    suffixes: tuple = ()  # an Endor tensor's part suffixes, in `parts` order
    version: int = 2

    @property
    def nbytes(self) -> int:
        return sum(p.end - p.start for p in self.parts)


class EndorSource:
    """Names, dtypes and shapes of every logical tensor of an Endor checkpoint, and `read`."""

    def __init__(self, path):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FormatError("no config.json: an Endor checkpoint keeps its model's config "
                              "beside the shards", path=self.path)
        checkpoint = Checkpoint(self.path)  # manifest and every shard's layout checked
        self.manifest = checkpoint.manifest
        self.files = [s.file for s in checkpoint.shards]
        self._entries: dict[str, _Entry] = {}
        for file in self.files:
            with checkpoint.open(file) as f:
                for name in f.keys():
                    self._entries[name] = self._entry(file, f, name)
        self._prior = self._prior_pruning()

    def _entry(self, file: str, f, name: str) -> _Entry:
        stored = f.header.tensors
        if f.is_compressed(name):
            entry = f.entry(name)
            suffixes = tuple(f.part_suffixes(name))
            parts = tuple(stored[spec.part_name(name, s)] for s in suffixes)
            return _Entry(file, tuple(entry.shape), entry.dtype, parts, entry.checksum, entry,
                          suffixes, f.version or 1)
        st: StoredTensor = stored[name]
        if st.dtype not in SAFETENSORS_DTYPES:
            raise FormatError(f"dtype {st.dtype} is not supported", path=self.path / file,
                              tensor=name)
        return _Entry(file, tuple(st.shape), SAFETENSORS_DTYPES[st.dtype], (st,),
                      f.dense_checksum(name))

    def _prior_pruning(self) -> list:
        """How the weights were pruned before this conversion: the source's own prior pruning,
        then the pruning its conversion did (if any)."""
        prior = self.manifest.get("prior_pruning", [])
        if not isinstance(prior, list) or not all(isinstance(p, dict) for p in prior):
            raise FormatError(f"'prior_pruning' in {MANIFEST} must be a list of objects",
                              path=self.path / MANIFEST)
        own = {k: self.manifest.get(k) for k in _PRUNING_KEYS}
        return [*prior, own] if own["method"] not in (None, "none") else list(prior)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def _get(self, name: str) -> _Entry:
        if name not in self._entries:
            raise KeyError(f"{name!r} is not in the checkpoint {self.path}")
        return self._entries[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._get(name).dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self._get(name).shape

    def nbytes(self, name: str) -> int:
        """Bytes read for `name` (its stored, compressed size)."""
        return self._get(name).nbytes

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def read(self, name: str) -> torch.Tensor:
        """A new dense CPU tensor holding `name` (decompressed, checksum verified)."""
        entry = self._get(name)
        path = self.path / entry.file
        parts = [read_stored(path, part, name) for part in entry.parts]
        if entry.entry is None:
            check_dense(parts[0], entry.parts[0], entry.checksum, name=name, path=path)
            return parts[0]
        et = check_compressed(endor_tensor(entry.entry, dict(zip(entry.suffixes, parts)),
                                           entry.version), name=name, path=path)
        try:
            return decompress(et)
        except FormatError as e:
            raise e.at(path=path, tensor=name) from None

    def fingerprint(self) -> str:
        """Config, manifest (its own source's fingerprint and settings), every tensor's name,
        dtype and shape, and each shard's size and first and last MiB (its header included,
        with the checksum of every Endor tensor)."""
        tensors = [(n, str(e.dtype), e.shape) for n, e in sorted(self._entries.items())]
        return fingerprint(self.path, tensors, self.files, ("config.json", MANIFEST))

    def prior_pruning(self) -> list:
        return list(self._prior)


def open_source(path):
    """The reader for a conversion source: an Endor checkpoint directory (it has endor.json)
    as an EndorSource, decompressing on read; any other directory as an HF checkpoint."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return EndorSource(path)
    qc = compressed_tensors_config(path)
    if qc is not None:  # llm-compressor's sparse-bitmask / pack-quantized weights, decoded
        return CompressedTensorsSource(path, qc)
    return SourceCheckpoint(path)
