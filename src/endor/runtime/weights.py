"""Putting checkpoint tensors into a model built on the meta device, and the one-time check of
every streamed shard (so a corrupt checkpoint fails at load, before any generation)."""

from __future__ import annotations

import math
import re
from collections import Counter

import torch
from torch import nn

from ..checkpoint import Checkpoint
from ..errors import FormatError
from ..format import EndorFile
from ..format.header import StoredTensor
from ..format.io import check_compressed, check_dense
from ..format.spec import SAFETENSORS_DTYPES
from .images import image_digest, part_view, planned_tensor
from .plan import LayerPlan
from .reader import ShardReader, aligned_buffer

_LAYER_GROUP = re.compile(r"^layers\.(\d+)$")


def layer_files(ckpt: Checkpoint) -> tuple[list[EndorFile], EndorFile]:
    """The shards of groups "layers.0" .. "layers.<L-1>" in order, and the "rest" shard."""
    groups = ckpt.group_shards()
    layers = {}
    for group, shard in groups.items():
        m = _LAYER_GROUP.match(group)
        if m:
            layers[int(m.group(1))] = shard
        elif group != "rest":
            raise FormatError(f"shard {shard.file} has group {group!r}; expected 'layers.<i>' or "
                              "'rest'", path=ckpt.path)
    if "rest" not in groups:
        raise FormatError("the checkpoint has no 'rest' shard (embeddings, norm, LM head)",
                          path=ckpt.path)
    if sorted(layers) != list(range(len(layers))):
        raise FormatError(f"decoder layer shards are not numbered 0..{len(layers) - 1}: "
                          f"{sorted(layers)}", path=ckpt.path)
    return [ckpt.open(layers[i].file) for i in range(len(layers))], ckpt.open(groups["rest"].file)


def stored_dtype(f: EndorFile, name: str) -> torch.dtype | None:
    if f.is_compressed(name):
        return f.entry(name)[1]
    return SAFETENSORS_DTYPES.get(f.header.tensors[name].dtype)


def model_dtype(files: list[EndorFile]) -> torch.dtype:
    """The floating dtype holding most elements in `files`: the dtype the checkpoint runs in."""
    count = Counter()
    for f in files:
        for name in f.keys():
            dtype = stored_dtype(f, name)
            if dtype is not None and dtype.is_floating_point:
                shape = f.entry(name)[0] if f.is_compressed(name) else f.header.tensors[name].shape
                count[dtype] += math.prod(shape)
    if not count:
        raise FormatError("holds no floating-point weights", path=files[0].path)
    return count.most_common(1)[0][0]


def find_layer_list(model: nn.Module, first_layer_names: list[str],
                    num_layers: int) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder layers: the one whose element 0 holds layer 0's tensors."""
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == num_layers:
            prefix = f"{path}.0."
            if first_layer_names and all(n.startswith(prefix) for n in first_layer_names):
                return path, module
    raise FormatError(f"no list of {num_layers} decoder layers in {type(model).__name__} holds "
                      f"the tensors of shard 'layers.0' ({first_layer_names[:2]}...): the "
                      "checkpoint and its config.json disagree")


def set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace parameter or buffer `name` (dotted, relative to `root`) by `value`."""
    module_path, _, leaf = name.rpartition(".")
    module = root.get_submodule(module_path) if module_path else root
    if leaf in module._parameters:
        module._parameters[leaf] = value if isinstance(value, nn.Parameter) else \
            nn.Parameter(value, requires_grad=False)
    elif leaf in module._buffers:
        module._buffers[leaf] = value
    else:
        raise FormatError(f"the model has no parameter or buffer {name!r}")


def load_dense(f: EndorFile, name: str, dtype: torch.dtype, *, device, backend) -> torch.Tensor:
    """One tensor from `f`, dense, on `device`, cast to `dtype` when it is floating point."""
    t = f.get_tensor(name, device=device, backend=backend)
    if t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)
    return t


def load_rest(model: nn.Module, f: EndorFile, layer_prefix: str, *, device, backend,
              skip: frozenset[str] = frozenset()) -> int:
    """Load every non-layer tensor but `skip` (read on demand: runtime/rest.py), tie what the
    model ties, check nothing outside the layers is left on the meta device. Returns the bytes
    now resident."""
    expected = {n: t for n, t in model.state_dict(keep_vars=True).items()
                if not n.startswith(layer_prefix)}
    ignore = [re.compile(p) for p in
              (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    ignore.append(re.compile(r"rotary_emb\.inv_freq$"))
    loaded = set()
    nbytes = 0
    for name in f.keys():
        if name in skip:
            continue
        if name not in expected:
            if any(p.search(name) for p in ignore):
                continue
            raise FormatError("is not a tensor of the model that config.json describes",
                              path=f.path, tensor=name)
        t = load_dense(f, name, expected[name].dtype, device=device, backend=backend)
        if t.shape != expected[name].shape:
            raise FormatError(f"has shape {list(t.shape)}, the model expects "
                              f"{list(expected[name].shape)}", path=f.path, tensor=name)
        set_tensor(model, name, t)
        loaded.add(name)
        nbytes += t.numel() * t.element_size()
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target not in loaded and source in loaded:
            set_tensor(model, target, model.get_parameter(source))
            loaded.add(target)
    missing = sorted(n for n, t in model.state_dict(keep_vars=True).items()
                     if not n.startswith(layer_prefix) and t.device.type == "meta")
    if missing:
        raise FormatError(f"the checkpoint lacks {missing[:3]}, which the model needs outside its "
                          "decoder layers", path=f.path)
    return nbytes


def load_resident_layer(layer: nn.Module, f: EndorFile, plan: LayerPlan, prefix: str, *,
                        device, backend) -> None:
    for tp in plan.tensors:
        set_tensor(layer, tp.name, load_dense(f, prefix + (tp.source_name or tp.name), tp.dtype,
                                              device=device, backend=backend))


def check_shard(plan: LayerPlan, reader: ShardReader,
                image: torch.Tensor) -> tuple[int, ...]:
    """Read a streamed shard whole through `reader` into `image`, check every tensor's stored
    checksum (and an Endor tensor's tile index, rule 5), and return the digest of the whole
    image that every later read of it must match. Dense tensors of files without stored
    checksums (version 1) are taken as read here."""
    reader.read_into(plan.file, image, plan.file_size)
    staged = any(p.staging is not None for tp in plan.tensors for p in tp.parts)
    scratch = torch.empty(plan.dense_buffer_bytes if staged else 0, dtype=torch.uint8)
    for tp in plan.tensors:
        parts = [part_view(image, scratch, p) for p in tp.parts]
        if tp.compressed:
            check_compressed(planned_tensor(tp, parts), name=tp.name, path=plan.file)
        else:
            check_dense(parts[0], StoredTensor(tp.stored[0], tp.stored[1], 0, 0), tp.checksum,
                        name=tp.name, path=plan.file)
    return image_digest(image, plan.file_size)


def check_streamed(plans: list[LayerPlan], reader: ShardReader, *, hold: bool, pin: bool,
                   verify: bool = True):
    """check_shard over every streamed layer. Returns ({layer: digest}, {layer: image} when
    `hold` (cpu offload keeps every shard's bytes in host memory) else None). Not `verify`: no
    digests, and only the shards to hold are read (unchecked)."""
    digests, held = {}, ({} if hold else None)
    scratch = None
    for plan in plans:
        if not verify:
            if hold:
                held[plan.index] = aligned_buffer(plan.file_size, pin=pin)
                reader.read_into(plan.file, held[plan.index], plan.file_size)
            continue
        if hold:
            image = aligned_buffer(plan.file_size, pin=pin)
            held[plan.index] = image
        else:
            if scratch is None:
                scratch = aligned_buffer(max(p.file_size for p in plans))
            image = scratch
        digests[plan.index] = check_shard(plan, reader, image)
    return digests, held
