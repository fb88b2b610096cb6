"""A HuggingFace checkpoint directory read tensor by tensor, never whole
(`endor_source.open_source` tells it apart from an Endor checkpoint directory).

Tensors are read with explicit positioned reads (`os.preadv`) into a fresh buffer instead of
through safetensors' mmap: pages of a mapped file count in the process's RSS for as long as the
mapping lives, so mmap reading would make peak RSS grow with the model. Headers are parsed (and
checked: a truncated shard is caught here) by `endor.format.header.read_header`."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from ..errors import FormatError
from ..format.header import StoredTensor, read_header
from ..format.read import read_stored  # noqa: F401  (also endor_source's)
from ..format.spec import SAFETENSORS_DTYPES

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_SHARD_RE = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")
_FINGERPRINT_BYTES = 1 << 20



def _shard_files(root: Path) -> tuple[list[str], dict[str, str] | None]:
    """The weight files HF's from_pretrained would read, and the index's weight map if any."""
    index = root / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise FormatError(f"{INDEX} is not a valid index (needs a 'weight_map' object): {e}",
                              path=index) from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and "/" not in v
                for k, v in weight_map.items()):
            raise FormatError("'weight_map' must map tensor names to file names in the same "
                              "directory", path=index)
        files = sorted(set(weight_map.values()))
        for file in files:
            if not (root / file).is_file():
                raise FormatError(f"shard {file!r} listed in {INDEX} is missing; download or "
                                  "copy it again", path=root)
        return files, weight_map
    if (root / SINGLE).is_file():
        return [SINGLE], None
    shards = sorted(p.name for p in root.glob("model-*-of-*.safetensors")
                    if _SHARD_RE.match(p.name))
    if shards:
        total = int(_SHARD_RE.match(shards[0]).group(2))
        expected = [f"model-{i:05d}-of-{total:05d}.safetensors" for i in range(1, total + 1)]
        missing = sorted(set(expected) - set(shards))
        if missing or len(shards) != total:
            raise FormatError(f"the checkpoint has no {INDEX} and its shards are incomplete "
                              f"(missing: {', '.join(missing) or 'shards of another count'})",
                              path=root)
        return shards, None
    others = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    hint = (f" (found {', '.join(others)}: pickled weights, which endor never loads; save the "
            "model with safetensors first)" if others else "")
    raise FormatError(f"no safetensors weights ({INDEX}, {SINGLE} or model-XXXXX-of-YYYYY."
                      f"safetensors){hint}", path=root)


class SourceCheckpoint:
    """Names, dtypes and shapes of every tensor of an HF directory, and `read(name)`."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"source checkpoint directory not found: {self.path}")
        if not (self.path / "config.json").is_file():
            raise FormatError("no config.json: not a HuggingFace model directory", path=self.path)
        self.files, weight_map = _shard_files(self.path)
        self._where: dict[str, tuple[Path, StoredTensor]] = {}
        for file in self.files:
            header = read_header(self.path / file)
            for name, stored in header.tensors.items():
                if name in self._where:
                    raise FormatError(f"tensor is stored twice (in {self._where[name][0].name} "
                                      f"and {file})", path=self.path, tensor=name)
                if stored.dtype not in SAFETENSORS_DTYPES:
                    raise FormatError(f"dtype {stored.dtype} is not supported",
                                      path=self.path / file, tensor=name)
                self._where[name] = (self.path / file, stored)
        for name, file in (weight_map or {}).items():
            if name not in self._where or self._where[name][0].name != file:
                raise FormatError(f"{INDEX} maps the tensor to {file}, which does not hold it",
                                  path=self.path, tensor=name)

    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name) -> bool:
        return name in self._where

    def dtype(self, name: str) -> torch.dtype:
        return SAFETENSORS_DTYPES[self._stored(name).dtype]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._stored(name).shape

    def nbytes(self, name: str) -> int:
        s = self._stored(name)
        return s.end - s.start

    @property
    def total_bytes(self) -> int:
        return sum(s.end - s.start for _, s in self._where.values())

    def _stored(self, name: str) -> StoredTensor:
        if name not in self._where:
            raise KeyError(f"{name!r} is not in the checkpoint {self.path}")
        return self._where[name][1]

    def read(self, name: str) -> torch.Tensor:
        """A new CPU tensor holding `name`, read with positioned reads (no mmap)."""
        return read_stored(self._where[name][0], self._stored(name), name)

    def fingerprint(self) -> str:
        """Identifies the source cheaply, so a resumed conversion can refuse an OUT made from
        another model."""
        return fingerprint(self.path, [(n, self._stored(n).dtype, self._stored(n).shape)
                                       for n in self.names()], self.files)

    def prior_pruning(self) -> None:
        """An HF checkpoint carries no record of pruning (see EndorSource.prior_pruning)."""
        return None


def fingerprint(root: Path, tensors, files: list[str], extra_files=("config.json",)) -> str:
    """sha256 over `extra_files` (config...), every tensor's (name, dtype, shape), and each
    weight file's name, size and first and last MiB (other weights of the same architecture
    differ there). Unchanged since the first version: OUTs written then still resume."""
    h = hashlib.sha256()
    for extra in extra_files:
        h.update((root / extra).read_bytes())
    for name, dtype, shape in tensors:
        h.update(f"\0{name}\0{dtype}\0{list(shape)}".encode())
    for file in files:
        with open(root / file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            h.update(f"\0{file}\0{size}\0".encode())
            h.update(f.read(_FINGERPRINT_BYTES))
            f.seek(max(0, size - _FINGERPRINT_BYTES))
            h.update(f.read(_FINGERPRINT_BYTES))
    return "sha256:" + h.hexdigest()
