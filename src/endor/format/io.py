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
from .validate import check_entry, check_tiles, expected_parts, parse_metadata


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
    entries = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        if spec.is_part_name(name):
            raise ValueError(f"tensor name {name!r} ends in a suffix reserved by the format "
                             f"({', '.join(spec.PART_SUFFIXES)}); rename it")
        if isinstance(t, EndorTensor):
            entries[name] = t.metadata()
            for part_name, part in zip(spec.part_names(name), (t.bitmap, t.values, t.tiles)):
                flat[part_name] = part.detach().cpu().contiguous()
        elif isinstance(t, torch.Tensor):
            flat[name] = t.detach().cpu().contiguous()
        else:
            raise TypeError(f"tensor {name!r} is a {type(t).__name__}, expected a torch.Tensor "
                            "or an endor.EndorTensor")
    if entries:
        user_meta[spec.METADATA_KEY] = json.dumps(
            {"format": spec.FORMAT_NAME, "version": spec.VERSION, "tensors": entries})
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
        if name in entries:
            bitmap, values, tiles = spec.part_names(name)
            return [tiles, values, bitmap]  # the 8-byte-aligned part first
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
        self.dense_names = [n for n in self.header.tensors if not spec.is_part_name(n)]

    def _check_layout(self) -> dict:
        entries = {}
        stored = self.header.tensors
        for name, raw in parse_metadata(self.header.metadata.get(spec.METADATA_KEY)).items():
            if name in stored:
                raise FormatError("is both a dense tensor and an Endor tensor", tensor=name)
            shape, dtype, nnz, digest = check_entry(name, raw)
            for suffix, (st_dtype, st_shape) in expected_parts(shape, dtype, nnz).items():
                part = stored.get(name + suffix)
                if part is None:
                    raise FormatError(f"part {name + suffix!r} is missing", tensor=name)
                if part.dtype != st_dtype or list(part.shape) != st_shape:
                    raise FormatError(f"part {name + suffix!r} is {part.dtype}{list(part.shape)}, "
                                      f"expected {st_dtype}{st_shape}", tensor=name)
            entries[name] = (shape, dtype, nnz, digest)
        for name in stored:
            if spec.is_part_name(name) and name.rsplit(".endor.", 1)[0] not in entries:
                raise FormatError("is a format part with no metadata entry", tensor=name)
        return entries

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

    def entry(self, name: str):
        """(shape, dtype, nnz, checksum) of an Endor tensor, from the header alone."""
        self._require(name)
        return self._entries[name]

    def byte_ranges(self, name: str) -> list[tuple[int, int]]:
        """Absolute [start, end) file ranges holding `name` (its parts, for an Endor tensor)."""
        self._require(name)
        names = spec.part_names(name) if name in self._entries else (name,)
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
        shape, dtype, nnz, digest = self.entry(name)
        if name not in self._entries:
            raise KeyError(f"{name!r} is a dense tensor in {self.path}; use get_tensor")
        bitmap, values, tiles = (self._read(p) for p in spec.part_names(name))
        et = EndorTensor(shape, dtype, bitmap, values, tiles, digest)
        return check_compressed(et, name=name, path=self.path, verify=verify)

    def get_tensor(self, name: str, device="cpu", backend: str = "auto") -> torch.Tensor:
        """One tensor, dense (decompressed if stored compressed)."""
        self._require(name)
        if name in self._entries:
            try:
                return decompress(self.get_compressed(name), device=device, backend=backend)
            except FormatError as e:
                raise e.at(path=self.path, tensor=name) from None
        return self._read(name).to(device)


def check_compressed(et: EndorTensor, *, name=None, path=None, verify=True) -> EndorTensor:
    """Rules 5 and 7 on parts read from a file."""
    try:
        check_tiles(et.tiles, et.numel, et.nnz)
        if verify and not et.verify_checksum():
            raise FormatError("checksum mismatch: the data is corrupt")
    except FormatError as e:
        raise e.at(path=path, tensor=name) from None
    return et


def open_file(path) -> EndorFile:
    return EndorFile(path)


def load_file(path, device="cpu", backend: str = "auto") -> dict[str, torch.Tensor]:
    """Every tensor of `path`, dense (Endor tensors decompressed) on `device`."""
    with EndorFile(path) as f:
        return {name: f.get_tensor(name, device=device, backend=backend) for name in f.keys()}
