"""Endor files: safetensors files holding Endor tensors beside dense ones (docs/FORMAT.md)."""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file as _st_save_file

from ..errors import FormatError
from . import spec
from .decompress import decompress
from .header import read_header
from .read import read_stored
from .tensor import EndorTensor
from .checksum import dense_checksum
from .codecs import get_codec
from .validate import (Entry, check_dense_entry, check_entry, check_tiles, expected_parts,
                       parse_metadata)


def save_file(tensors: Mapping, path, metadata: Mapping[str, str] | None = None, *,
              order: Sequence[str] | None = None) -> None:
    """Write dense tensors and EndorTensors to one safetensors file, atomically (temporary name,
    then rename).

    `order`: logical names whose bytes come last in the file, in this sequence, each tensor's
    parts adjacent (tiles, values, bitmap): a group of tensors written one after the other is
    then one contiguous byte range (the experts of a mixture-of-experts layer, docs/FORMAT.md
    section 2). Without it the safetensors library lays the file out (by dtype, then name)."""
    path = Path(path)
    user_meta = dict(metadata or {})
    if spec.METADATA_KEY in user_meta:
        raise ValueError(f"metadata key {spec.METADATA_KEY!r} is reserved for the format")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in user_meta.items()):
        raise ValueError("metadata must map str to str (as safetensors requires)")
    flat: dict[str, torch.Tensor] = {}
    entries, dense = {}, {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        if spec.is_part_name(name):
            raise ValueError(f"tensor name {name!r} ends in '{spec.PART_MARKER}<word>', which "
                             "the format reserves for the parts of Endor tensors; rename it")
        if isinstance(t, EndorTensor):
            t = t.upgraded()
            entries[name] = t.metadata()
            for suffix, part in t.stored_parts().items():
                flat[spec.part_name(name, suffix)] = part.detach().cpu().contiguous()
        elif isinstance(t, torch.Tensor):
            data = t.detach().cpu().contiguous()
            if data.dtype not in spec.SAFETENSORS_NAMES:
                raise ValueError(f"tensor {name!r} has dtype {data.dtype}, which safetensors "
                                 "cannot store")
            flat[name] = data
            dense[name] = {"checksum": dense_checksum(spec.SAFETENSORS_NAMES[data.dtype],
                                                      data.shape, data)}
        else:
            raise TypeError(f"tensor {name!r} is a {type(t).__name__}, expected a torch.Tensor "
                            "or an endor.EndorTensor")
    user_meta[spec.METADATA_KEY] = json.dumps(
        {"format": spec.FORMAT_NAME, "version": spec.VERSION, "tensors": entries,
         "dense": dense})
    tmp = path.with_name(path.name + ".tmp")
    try:
        if order is None:
            try:
                _st_save_file(flat, str(tmp), metadata=user_meta or None)
            except SafetensorError as e:
                raise _as_os_error(e, path) from None
            _sort_metadata(tmp)
        else:
            _write_ordered(flat, _storage_order(flat, entries, order), tmp, user_meta)
        chmod_as_created(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _storage_order(flat: dict, entries: dict, order: Sequence[str]) -> list[str]:
    """Stored names: those outside `order` first (sorted), then `order`'s, parts adjacent."""
    unknown = [n for n in order if n not in entries and n not in flat]
    if unknown or len(set(order)) != len(order):
        raise ValueError(f"order must list distinct tensor names of this file, got {unknown[:3]}")

    def stored(name):
        if name in entries:  # every part of it (which parts: its codec's), tiles first
            parts = sorted(n for n in flat if spec.is_part_name(n)
                           and n.rsplit(spec.PART_MARKER, 1)[0] == name)
            return sorted(parts, key=lambda n: not n.endswith(spec.PART_MARKER + "tiles"))
        return [name]

    last = [s for name in order for s in stored(name)]
    placed = set(last)
    return sorted(n for n in flat if n not in placed) + last


def _write_ordered(flat: dict, names: list[str], path: Path, metadata: dict) -> None:
    """A safetensors file with the tensors' bytes in the sequence `names` (the format leaves
    the order of data to the writer; readers follow the offsets)."""
    header, offset = {}, 0
    for name in names:
        t = flat[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header = {"__metadata__": dict(sorted(metadata.items())), **header}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            t = flat[name]
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


_ST_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                   torch.float64: "F64", torch.int64: "I64", torch.int32: "I32",
                   torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
def _as_os_error(e: SafetensorError, path) -> Exception:
    """The library reports a full or failing disk as a SafetensorError; callers (and the CLI)
    expect the OSError it is, with its errno and the file's name."""
    found = re.search(r"os error (\d+)", str(e))
    if found is None:
        return e
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


def process_umask() -> int:
    """The process umask, read without changing it (os.umask can only swap, racing threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def chmod_as_created(path) -> None:
    """Give a file the safetensors library wrote (it creates them 0600) the mode open() gives:
    0666 less the umask, so a checkpoint can be shared between users as any other file."""
    os.chmod(path, 0o666 & ~process_umask())


def _sort_metadata(path: Path) -> None:
    """Rewrite the header with `__metadata__` keys sorted, in place and at the same length: the
    safetensors library stores metadata in a hash map whose order changes from call to call, and
    identical inputs must give byte-identical files (resumed conversions are compared so)."""
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        assert len(raw) <= n, "a permutation of the same JSON cannot grow"
        f.seek(8)
        f.write(raw.ljust(n, b" "))  # safetensors pads its header with spaces


class EndorFile:
    """Lazy access to one file: open it, list names, read one tensor (dense or compressed) without
    reading the others. Every rule of docs/FORMAT.md that needs no data is checked on open."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such Endor/safetensors file: {self.path}")
        self.header = read_header(self.path)
        try:
            # The library's own layout checks (no overlaps, no holes); its memory map is dropped
            # at once: tensors are read with positioned reads (_read), never through a map.
            with safe_open(str(self.path), framework="pt"):
                pass
        except (SafetensorError, OSError, ValueError) as e:
            raise FormatError(f"not a valid safetensors file: {e}", path=self.path) from None
        try:
            self._entries = self._check_layout()
        except FormatError as e:
            raise e.at(path=self.path) from None
        self.dense_names = [n for n in self.header.tensors
                            if not spec.is_part_name(n, self.version or 1)]

    def _check_layout(self) -> dict:
        """Rules 2-4 and 8 -> {name: Entry}; sets version and the dense checksums."""
        stored = self.header.tensors
        meta = parse_metadata(self.header.metadata.get(spec.METADATA_KEY))
        self.version = meta.version if meta is not None else None
        version = self.version or 1
        self._dense_checksums = {}
        entries = {}
        for name, raw in (meta.tensors if meta is not None else {}).items():
            if name in stored:
                raise FormatError("is both a dense tensor and an Endor tensor", tensor=name)
            entry = check_entry(name, raw, version)
            for suffix, (st_dtype, st_shape) in expected_parts(entry, version).items():
                part_name = spec.part_name(name, suffix)
                part = stored.get(part_name)
                if part is None:
                    raise FormatError(f"part {part_name!r} is missing", tensor=name)
                if part.dtype != st_dtype or list(part.shape) != st_shape:
                    raise FormatError(f"part {part_name!r} is {part.dtype}{list(part.shape)}, "
                                      f"expected {st_dtype}{st_shape}", tensor=name)
            entries[name] = entry
        for name in stored:
            if spec.is_part_name(name, version) and not self._is_part_of(name, entries, version):
                raise FormatError("is a format part with no metadata entry", tensor=name)
        if meta is not None and meta.version >= 2:
            dense_names = {n for n in stored if not spec.is_part_name(n, version)}
            if set(meta.dense) != dense_names:
                extra = sorted(set(meta.dense) - dense_names)
                missing = sorted(dense_names - set(meta.dense))
                raise FormatError(f"the 'dense' metadata does not list exactly the dense tensors "
                                  f"(listed but absent: {extra[:3]}, present but unlisted: "
                                  f"{missing[:3]})")
            self._dense_checksums = {n: check_dense_entry(n, raw) for n, raw in meta.dense.items()}
        return entries

    def _is_part_of(self, part_name: str, entries: dict, version: int) -> bool:
        owner = spec.owner_name(part_name)
        entry = entries.get(owner)
        return (entry is not None and
                part_name[len(owner) + len(spec.PART_MARKER):] in expected_parts(entry, version))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Nothing to release: no file stays open or mapped between reads."""

    def keys(self) -> list[str]:
        return sorted([*self.dense_names, *self._entries])

    def __contains__(self, name) -> bool:
        return name in self._entries or name in self.dense_names

    def is_compressed(self, name: str) -> bool:
        self._require(name)
        return name in self._entries

    def metadata(self) -> dict[str, str]:
        """The user's metadata (the format's own entry removed)."""
        return {k: v for k, v in self.header.metadata.items() if k != spec.METADATA_KEY}

    def entry(self, name: str) -> Entry:
        """The checked metadata entry of an Endor tensor (shape, dtype, nnz, checksum, codec,
        params), from the header alone; unpacks as (shape, dtype, nnz, checksum)."""
        self._require(name)
        return self._entries[name]

    def dense_checksum(self, name: str) -> str | None:
        """A dense tensor's stored checksum (None in files without one: version 1, plain
        safetensors)."""
        self._require(name)
        return self._dense_checksums.get(name)

    def part_suffixes(self, name: str) -> list[str]:
        """The stored parts of Endor tensor `name`, in checksum order ("bitmap", "tiles", ...)."""
        return list(expected_parts(self.entry(name), self.version or 1))

    def part_ranges(self, name: str) -> dict[str, tuple[int, int]]:
        """Endor tensor `name`'s parts: suffix -> absolute [start, end) file range."""
        return {s: (self.header.tensors[spec.part_name(name, s)].start,
                    self.header.tensors[spec.part_name(name, s)].end)
                for s in self.part_suffixes(name)}

    def byte_ranges(self, name: str) -> list[tuple[int, int]]:
        """Absolute [start, end) file ranges holding `name` (its parts, for an Endor tensor)."""
        self._require(name)
        names = ([spec.part_name(name, s) for s in self.part_suffixes(name)]
                 if name in self._entries else (name,))
        return [(self.header.tensors[n].start, self.header.tensors[n].end) for n in names]

    def _require(self, name: str) -> None:
        if name not in self:
            raise KeyError(f"{name!r} is not in {self.path}")

    def _read(self, name: str) -> torch.Tensor:
        """A copy in memory this process owns: a later change to the file cannot alter it, and
        a file that shrank since open is a FormatError, never a SIGBUS."""
        return read_stored(self.path, self.header.tensors[name], name)

    def get_compressed(self, name: str, *, verify: bool = True) -> EndorTensor:
        """One Endor tensor, compressed, on the CPU; checks rules 5 and 7 (unless verify=False,
        for callers that already checked)."""
        entry = self.entry(name)
        if name not in self._entries:
            raise KeyError(f"{name!r} is a dense tensor in {self.path}; use get_tensor")
        parts = {s: self._read(spec.part_name(name, s)) for s in self.part_suffixes(name)}
        et = endor_tensor(entry, parts, self.version or 1)
        return check_compressed(et, name=name, path=self.path, verify=verify)

    def get_tensor(self, name: str, device="cpu", backend: str = "auto") -> torch.Tensor:
        """One tensor, dense (decompressed if stored compressed), its checksum verified."""
        self._require(name)
        if name in self._entries:
            try:
                return decompress(self.get_compressed(name), device=device, backend=backend)
            except FormatError as e:
                raise e.at(path=self.path, tensor=name) from None
        t = self._read(name)
        check_dense(t, self.header.tensors[name], self.dense_checksum(name), name=name,
                    path=self.path)
        return t.to(device)


def endor_tensor(entry: Entry, parts: dict, version: int) -> EndorTensor:
    """An EndorTensor from a checked entry and its parts by suffix (not yet checked: rules 5-7)."""
    codec_parts = {s: p for s, p in parts.items() if s not in ("bitmap", "tiles")}
    return EndorTensor(entry.shape, entry.dtype, parts["bitmap"], None, parts["tiles"],
                       entry.checksum, entry.codec, entry.params, codec_parts, version, entry.nnz)


def check_dense(t: torch.Tensor, stored, digest: str | None, *, name=None, path=None) -> None:
    """Rule 7 for a dense tensor read from a file (`stored`: its header's StoredTensor); nothing
    to check without a stored checksum."""
    if digest is not None and dense_checksum(stored.dtype, stored.shape, t) != digest:
        raise FormatError("checksum mismatch: the data is corrupt", path=path, tensor=name)


def check_compressed(et: EndorTensor, *, name=None, path=None, verify=True) -> EndorTensor:
    """Rules 5 and 7 on parts read from a file."""
    try:
        check_tiles(et.tiles, et.numel, et.nnz)
        if verify and not et.verify_checksum():
            raise FormatError("checksum mismatch: the data is corrupt")
        if et.version >= 2:
            get_codec(et.values_codec).check_parts(et.codec_params, et.codec_parts, et.shape,
                                                   et.dtype, et.nnz)
    except FormatError as e:
        raise e.at(path=path, tensor=name) from None
    return et


def open_file(path) -> EndorFile:
    return EndorFile(path)


def load_file(path, device="cpu", backend: str = "auto") -> dict[str, torch.Tensor]:
    """Every tensor of `path`, dense (Endor tensors decompressed) on `device`."""
    with EndorFile(path) as f:
        return {name: f.get_tensor(name, device=device, backend=backend) for name in f.keys()}
