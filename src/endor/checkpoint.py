"""A converted checkpoint directory (docs/FORMAT.md section 2): shards written atomically one at a
time (so an interrupted conversion resumes from the shards already on disk), then an HF index and
the `endor.json` manifest. The writer and reader are the contract between conversion and runtime."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import FormatError
from .format import EndorFile, save_file

MANIFEST = "endor.json"
INDEX = "model.safetensors.index.json"
CHECKPOINT_FORMAT = "endor-checkpoint"
CHECKPOINT_VERSION = 1
MAX_MANIFEST_BYTES = 64 * 2**20
WEIGHT_KINDS = ("endor", "dense")
HF_CONFIG = "config.json"
# What an "endor"-weights checkpoint's config.json says to transformers (docs/FORMAT.md section
# 2): its quant_method, which `import endor` registers, and, because transformers only warns about
# an unknown quant_method and would then load the model with every compressed weight randomly
# initialised, a weights file that does not exist: without endor, from_pretrained fails naming
# it; endor's quantizer removes it before transformers looks for weights.
HF_QUANT_METHOD = "endor"
HF_GUARD_FILE = "endor-checkpoint--import-endor-before-from_pretrained.safetensors.index.json"


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


@dataclass(frozen=True)
class Shard:
    file: str
    group: str  # "layers.<i>" for decoder layer i, "rest" for everything else


class CheckpointWriter:
    """Writes shard i (a group of tensors) at a time; `finish` writes the index and manifest."""

    def __init__(self, out_dir, groups: list[str], *, weights: str = "endor"):
        if weights not in WEIGHT_KINDS:
            raise ValueError(f"weights must be one of {WEIGHT_KINDS}, got {weights!r}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.weights = weights
        self.shards = [Shard(shard_name(i, len(groups)), g) for i, g in enumerate(groups)]

    def path(self, i: int) -> Path:
        return self.out_dir / self.shards[i].file

    def is_done(self, i: int) -> bool:
        """A shard on disk under its final name is complete: it was renamed into place last."""
        return self.path(i).is_file()

    def write(self, i: int, tensors: Mapping, metadata: Mapping[str, str] | None = None, *,
              order=None) -> Path:
        """Write shard i. save_file writes under a temporary name and renames the file into place
        (a shard under its final name is complete: resume relies on it), with its metadata
        sorted (identical conversions give byte-identical shards). `order`: names stored last,
        in sequence (an MoE layer's experts, one contiguous range each: FORMAT.md section 2)."""
        meta = {"endor.group": self.shards[i].group, **(metadata or {})}
        save_file(tensors, self.path(i), metadata=meta, order=order)
        return self.path(i)

    def stream(self, i: int, entries: Mapping, metadata: Mapping[str, str] | None = None):
        """A StreamWriter for shard i ({name: (dtype, shape)}), for tensors too large to hold
        whole: the caller writes their bytes in chunks, in the writer's order, then closes it
        (which renames the shard into place, as `write` does)."""
        from .format.stream_writer import StreamWriter
        meta = {"endor.group": self.shards[i].group, **(metadata or {})}
        return StreamWriter(self.path(i), entries, meta)

    def finish(self, manifest: Mapping) -> Path:
        mark_hf_config(self.out_dir, self.weights)
        weight_map, total = {}, 0
        for i, shard in enumerate(self.shards):
            if not self.is_done(i):
                raise RuntimeError(f"shard {shard.file} was never written")
            with EndorFile(self.path(i)) as f:
                for name in f.keys():
                    weight_map[name] = shard.file
            total += self.path(i).stat().st_size
        _write_json_atomic(self.out_dir / INDEX,
                           {"metadata": {"total_size": total}, "weight_map": weight_map})
        body = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "weights": self.weights, **manifest,
                "shards": [{"file": s.file, "group": s.group} for s in self.shards]}
        _write_json_atomic(self.out_dir / MANIFEST, body)
        return self.out_dir / MANIFEST


def mark_hf_config(out_dir, weights: str) -> None:
    """Add (weights "endor") or remove (weights "dense": transformers loads those as they are)
    the quantization_config and guard in OUT's config.json, if there is one. A source's own
    quantization_config goes too: OUT's weights are what endor wrote, not the source's."""
    path = Path(out_dir) / HF_CONFIG
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{HF_CONFIG} is not valid JSON ({e})", path=path) from None
    if not isinstance(config, dict):
        raise FormatError(f"{HF_CONFIG} is not a JSON object", path=path)
    before = dict(config)
    config.pop("quantization_config", None)
    if config.get("transformers_weights") == HF_GUARD_FILE:
        del config["transformers_weights"]
    if weights == "endor":
        config["quantization_config"] = {"quant_method": HF_QUANT_METHOD,
                                         "checkpoint_version": CHECKPOINT_VERSION}
        config["transformers_weights"] = HF_GUARD_FILE
    if config != before:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)


def require_checkpoint(path) -> Path:
    """`path` as a Path if it looks like a converted checkpoint (a directory with a manifest);
    otherwise an error that says what it is and what to run."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint directory: {path}")
    if not path.is_dir():
        raise FormatError("is a file, not a checkpoint directory; convert a model into one with "
                          "`endor convert SRC OUT`", path=path)
    if not (path / MANIFEST).is_file():
        if (path / "config.json").is_file():
            raise FormatError(f"is a HuggingFace model directory, not an Endor checkpoint (no "
                              f"{MANIFEST}); convert it first: `endor convert {path} OUT "
                              "--method none` (or --method wanda to prune)", path=path)
        raise FormatError(f"not an Endor checkpoint (no {MANIFEST}); create one with "
                          "`endor convert SRC OUT`", path=path)
    return path


class Checkpoint:
    """A converted checkpoint, opened for reading: manifest checked, every shard header checked."""

    def __init__(self, path):
        self.path = require_checkpoint(path)
        manifest_path = self.path / MANIFEST
        if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
            raise FormatError(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES} bytes",
                              path=manifest_path)
        try:
            self.manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(f"{MANIFEST} is not valid JSON ({e})", path=manifest_path) from None
        m = self.manifest
        if not isinstance(m, dict) or m.get("format") != CHECKPOINT_FORMAT:
            raise FormatError(f"{MANIFEST} is not an Endor checkpoint manifest",
                              path=manifest_path)
        if m.get("version") != CHECKPOINT_VERSION:
            raise FormatError(f"checkpoint version {m.get('version')!r} is not supported (this "
                              f"endor reads {CHECKPOINT_VERSION}); upgrade endor",
                              path=manifest_path)
        if m.get("weights") not in WEIGHT_KINDS:
            raise FormatError(f"'weights' must be one of {WEIGHT_KINDS}", path=manifest_path)
        shards = m.get("shards")
        if not isinstance(shards, list) or not all(
                isinstance(s, dict) and isinstance(s.get("file"), str)
                and isinstance(s.get("group"), str) and "/" not in s["file"]
                and s["file"].endswith(".safetensors") for s in shards):
            raise FormatError("'shards' must list {file, group} objects naming .safetensors files "
                              "in the checkpoint directory", path=manifest_path)
        self.weights: str = m["weights"]
        self.shards = [Shard(s["file"], s["group"]) for s in shards]
        self._files: dict[str, EndorFile] = {}
        self.weight_map: dict[str, str] = {}
        for shard in self.shards:
            f = self.open(shard.file)
            for name in f.keys():
                if name in self.weight_map:
                    raise FormatError(f"tensor appears in both {self.weight_map[name]} and "
                                      f"{shard.file}", path=self.path, tensor=name)
                self.weight_map[name] = shard.file

    def open(self, file: str) -> EndorFile:
        if file not in self._files:
            p = self.path / file
            if not p.is_file():
                raise FormatError(f"shard {file} is missing; the checkpoint is incomplete "
                                  "(rerun `endor convert`, which resumes)", path=self.path)
            self._files[file] = EndorFile(p)
        return self._files[file]

    def file_of(self, name: str) -> EndorFile:
        if name not in self.weight_map:
            raise KeyError(f"{name!r} is not in checkpoint {self.path}")
        return self.open(self.weight_map[name])

    def group_shards(self) -> dict[str, Shard]:
        return {s.group: s for s in self.shards}
