"""The output directory of a conversion: resuming into it safely, replacing it whole
(--overwrite), copying the source's config and tokenizer files, and checking each shard right
after it is written."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import filecmp
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..checkpoint import INDEX, MANIFEST, CheckpointWriter
from ..errors import FormatError
from ..format import EndorTensor, open_file, spec
from ..format.checksum import dense_checksum
from ..format.spec import SAFETENSORS_DTYPES
from .summary import read_shard_metadata

_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# Weights and our own outputs are never copied from the source; everything else (config,
# generation config, tokenizer files, chat template, README) is.
_NOT_COPIED = re.compile(r"(\.(safetensors|bin|pt|pth|gguf|h5|msgpack|ckpt|onnx|tmp|partial)$)|"
                         r"(^(model\.safetensors\.index\.json|endor\.json)$)|(^\.)")
_VERIFY_CHUNK = 32 * 2**20


class SettingsMismatch(ValueError):
    """OUT holds (part of) a conversion made with other settings or from another model."""


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True)


def _flatten(settings, prefix: str = "") -> dict:
    flat = {}
    for key, value in (settings or {}).items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _differences(theirs: dict, ours: dict) -> str:
    """The settings that differ, one phrase each, in the options' words (no raw dicts)."""
    theirs, ours = _flatten(theirs), _flatten(ours)
    diff = []
    for key in sorted(set(theirs) | set(ours)):
        a, b = theirs.get(key), ours.get(key)
        if _canonical(a) == _canonical(b):
            continue
        if key == "source":
            diff.append("it was converted from another source model")
        elif key.endswith("sha256"):
            diff.append(f"{key.rsplit('.', 2)[0]} text differs")
        else:
            diff.append(f"{key} {json.dumps(a)} in OUT, {json.dumps(b)} now")
    return "; ".join(diff) or "different settings"


def _mismatch(out: Path, what: str) -> SettingsMismatch:
    return SettingsMismatch(f"{out} already holds a conversion with other settings ({what}); "
                            "write to a new OUT, or pass --overwrite to replace it")


def check_out(out: Path, src: Path) -> None:
    """OUT must be a directory (or not exist yet) and must not be or hold SRC."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT {out} is a file; give a directory (new, or a checkpoint to "
                         "resume or replace)")
    if out.exists():
        where = out.resolve()
        if where == src.resolve() or where in src.resolve().parents:
            raise ValueError(f"OUT {out} must not be SRC {src} or a directory holding it")


def _holds_checkpoint(out: Path) -> bool:
    return any(p.name == MANIFEST or _SHARD_RE.match(p.name) or p.name.endswith(
        ".safetensors.tmp") for p in out.iterdir())


def staging_dir(out: Path) -> Path:
    """Where --overwrite writes the new checkpoint: beside OUT (same filesystem, so the swap is
    a rename), hidden."""
    return out.with_name(f".{out.name}.endor-new")


@contextlib.contextmanager
def replacing(out: Path, *, replace: bool):
    """Yields the directory a conversion writes into. Resuming (not `replace`), or with nothing
    to replace, that is OUT itself. Otherwise it is a fresh staging directory beside OUT that is
    swapped in whole once the conversion has finished, so no file of the old checkpoint
    (tokenizer, chat template, generation config, manifest) survives, and a conversion that
    fails or is killed midway leaves the old checkpoint as it was (a killed one also leaves the
    staging directory, removed by the next --overwrite)."""
    if not replace or not out.is_dir() or not any(out.iterdir()):
        yield out
        return
    if not _holds_checkpoint(out):
        raise ValueError(f"OUT {out} is not empty and holds no Endor checkpoint; --overwrite "
                         "replaces only a checkpoint: choose a new or empty directory")
    work = staging_dir(out)
    shutil.rmtree(work, ignore_errors=True)  # a killed earlier --overwrite's
    work.mkdir()
    try:
        yield work
        _swap(work, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the old checkpoint now, or the failed new one


_RENAME_EXCHANGE = 2  # linux/fs.h


def _swap(new: Path, out: Path) -> None:
    """Put `new` in place of `out`; afterwards `new` holds the old checkpoint. One atomic
    renameat2(RENAME_EXCHANGE) where the OS and filesystem offer it (Linux >= 3.15), so a crash
    at any moment leaves OUT the old or the new checkpoint; elsewhere two renames."""
    exchange = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if exchange is not None:
        at_cwd = -100
        if exchange(at_cwd, os.fsencode(new), at_cwd, os.fsencode(out), _RENAME_EXCHANGE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, f"cannot swap in the new checkpoint: {os.strerror(code)}",
                          str(out))
    old = out.with_name(f".{out.name}.endor-old")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(out, old)
    os.rename(new, out)
    os.rename(old, new)


def prepare(writer: CheckpointWriter, settings: dict, *, resume: bool) -> list[int]:
    """Make OUT ready; returns the indices of the shards already complete (to be skipped).
    Refuses to resume into an OUT written with different settings."""
    out = writer.out_dir
    planned = {s.file for s in writer.shards}
    ours = [p for p in out.iterdir() if p.is_file() and (
        _SHARD_RE.match(p.name) or p.name.endswith(".safetensors.tmp")
        or p.name.endswith(".safetensors.partial")
        or p.name in (INDEX, MANIFEST, MANIFEST + ".tmp", INDEX + ".tmp"))]
    if not resume:
        for p in ours:
            p.unlink()
        return []
    for p in [*out.glob("*.safetensors.tmp"), *out.glob("*.safetensors.partial")]:
        p.unlink()  # left by a killed run (.partial: by earlier versions); rewritten
    settings = json.loads(_canonical(settings))
    manifest = out / MANIFEST
    if manifest.is_file():
        try:
            previous = json.loads(manifest.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _mismatch(out, f"{MANIFEST} is unreadable") from None
        theirs = {k: previous.get(k) for k in settings}
        if _canonical(theirs) != _canonical(settings):
            raise _mismatch(out, _differences(theirs, settings))
    strays = sorted(p.name for p in out.iterdir() if _SHARD_RE.match(p.name)
                    and p.name not in planned)
    if strays:
        raise _mismatch(out, f"it has shards of a different layout: {', '.join(strays[:3])}")
    done = []
    for i, shard in enumerate(writer.shards):
        if not writer.is_done(i):
            continue
        try:
            with open_file(writer.path(i)) as f:
                meta = read_shard_metadata(f)
                group = f.metadata().get("endor.group")
        except FormatError as e:
            raise FormatError(f"{e.reason}; delete this shard (it is rewritten on resume) or "
                              "pass --overwrite", path=writer.path(i)) from None
        if meta is None or group != shard.group:
            raise _mismatch(out, f"{shard.file} was not written by this conversion")
        if _canonical(meta[0]) != _canonical(settings):
            raise _mismatch(out, _differences(meta[0], settings))
        done.append(i)
    return done


def copy_side_files(src: Path, out: Path) -> list[str]:
    """Copy config, generation config and tokenizer files (atomically; unchanged ones kept)."""
    copied = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or _NOT_COPIED.search(p.name):
            continue
        dest = out / p.name
        if not (dest.is_file() and filecmp.cmp(p, dest, shallow=False)):
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.copyfile(p, tmp)
            os.replace(tmp, dest)
        copied.append(p.name)
    return copied


def _same_bytes_on_disk(path: Path, start: int, want: torch.Tensor) -> bool:
    """Whether the file's bytes [start, start + nbytes) are `want`'s bytes, read in chunks with
    positioned reads (no memory map: its pages would count in RSS)."""
    expected = want.contiguous().view(-1).view(torch.uint8).numpy()
    size = expected.size
    chunk = np.empty(min(size, _VERIFY_CHUNK), dtype=np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset in range(0, size, _VERIFY_CHUNK):
            n = min(_VERIFY_CHUNK, size - offset)
            if os.preadv(fd, [chunk[:n]], start + offset) != n:
                return False
            if not np.array_equal(chunk[:n], expected[offset:offset + n]):
                return False
    finally:
        os.close(fd)
    return True


def _stored_as(path: Path, stored, want: torch.Tensor) -> bool:
    """Whether a safetensors entry holds exactly `want` (dtype, shape and bytes)."""
    return (stored is not None and list(stored.shape) == list(want.shape)
            and SAFETENSORS_DTYPES.get(stored.dtype) == want.dtype
            and _same_bytes_on_disk(path, stored.start, want))


def verify_shard(path: Path, expected: dict) -> None:
    """Re-read a shard just written and compare every tensor bit for bit with what was meant
    (`expected`: {name: dense tensor or the EndorTensor that was written}). The file is opened
    as a reader would (layout rules checked); an Endor tensor's header entry must be the one
    written and its parts on disk must be its parts byte for byte, so the file decompresses to
    what the EndorTensor decompresses to (which the caller checked against the weight); dense
    tensors are compared byte by byte. All reads are chunked positioned reads. A shard that
    fails is deleted (so a rerun writes it again) and the error raised."""
    try:
        with open_file(path) as f:
            names = set(f.keys())
            stored = f.header.tensors
            entries = {n: f.entry(n) for n in names if f.is_compressed(n)}
            dense_sums = {n: f.dense_checksum(n) for n in names if not f.is_compressed(n)}
        if names != set(expected):
            raise FormatError(f"verification failed: the shard holds {sorted(names)}, expected "
                              f"{sorted(expected)}", path=path)
        for name, want in expected.items():
            if isinstance(want, EndorTensor):
                entry = entries.get(name)
                same = (entry is not None
                        and (list(entry.shape), entry.dtype, entry.nnz, entry.checksum,
                             entry.codec, entry.params)
                        == (list(want.shape), want.dtype, want.nnz, want.checksum,
                            want.values_codec, dict(want.codec_params))
                        and all(_stored_as(path, stored.get(spec.part_name(name, suffix)), part)
                                for suffix, part in want.stored_parts().items()))
            else:
                same = (_stored_as(path, stored.get(name), want)
                        and dense_sums.get(name) == dense_checksum(
                            spec.SAFETENSORS_NAMES[want.dtype], want.shape, want))
            if not same:
                raise FormatError("verification failed: the tensor read back differs from the "
                                  "one written (disk or encoder fault)", path=path, tensor=name)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
