"""Mixture-of-experts naming: the checkpoint's per-expert tensors and the model's fused ones.

transformers 5 builds MoE layers with fused 3-D expert parameters (`mlp.experts.gate_up_proj`
[E, 2I, H], `mlp.experts.down_proj` [E, H, I]) but saves and loads checkpoints with one 2-D
tensor per expert and projection (`mlp.experts.3.gate_proj.weight`; Mixtral:
`block_sparse_moe.experts.3.w1.weight`), converting on load. Endor checkpoints keep the per-expert
names (each expert is pruned and compressed on its own and read on its own); this module maps
them onto the model: gate_up_proj[e] = cat(gate_e, up_e) along rows, down_proj[e] = down_e,
exactly as transformers' MergeModulelist + Concatenate do."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

# Per-expert projection names -> their role in the fused parameters.
ROLES = {"gate_proj": "gate", "w1": "gate", "up_proj": "up", "w3": "up",
         "down_proj": "down", "w2": "down"}
_EXPERT = re.compile(r"^(?P<block>.*)\.experts\.(?P<e>\d+)\.(?P<proj>[A-Za-z0-9_]+)\.weight$")


def parse_expert_name(name: str) -> tuple[str, int, str] | None:
    """("<...>.block", expert, role) for a per-expert weight name, else None."""
    m = _EXPERT.match(name)
    if m is None or m.group("proj") not in ROLES:
        return None
    return m.group("block"), int(m.group("e")), ROLES[m.group("proj")]


def is_experts_module(module: nn.Module) -> bool:
    """transformers' fused experts: 3-D gate_up_proj [E, 2I, H] and down_proj [E, H, I]."""
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    return (isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
            and gate_up.dim() == 3 and down.dim() == 3 and not isinstance(module, nn.Linear))


@dataclass(frozen=True)
class ExpertNames:
    """One decoder layer's experts: where the model keeps them and what the checkpoint calls
    them. Names are relative to the decoder layer."""
    module: str  # the model's experts module, e.g. "mlp.experts"
    stored_block: str  # the checkpoint's MoE block, e.g. "mlp" or "block_sparse_moe"
    num_experts: int
    names: tuple  # per expert: (gate name, up name, down name) as stored

    @property
    def model_block(self) -> str:
        return self.module.rpartition(".")[0]

    def all_names(self) -> list[str]:
        return [n for triple in self.names for n in triple]

    def model_name(self, stored: str) -> str:
        """A non-expert tensor's name in the model (Mixtral's `block_sparse_moe.gate.weight` is
        the model's `mlp.gate.weight`)."""
        prefix = self.stored_block + "."
        if self.stored_block != self.model_block and stored.startswith(prefix):
            return self.model_block + "." + stored[len(prefix):]
        return stored


def find_experts(layer: nn.Module, stored_names) -> ExpertNames | None:
    """The experts of `layer` (a model decoder layer, possibly on meta) matched with
    `stored_names` (the checkpoint's tensor names relative to the layer). None for a dense
    layer. Raises ValueError when the two disagree."""
    modules = [n for n, m in layer.named_modules() if is_experts_module(m)]
    if not modules:
        return None
    if len(modules) > 1:
        raise ValueError(f"a decoder layer holds several expert groups ({modules}); "
                         "endor supports one per layer")
    module = layer.get_submodule(modules[0])
    num = module.gate_up_proj.shape[0]
    found: dict[tuple[int, str], str] = {}
    blocks = set()
    for name in stored_names:
        parsed = parse_expert_name(name)
        if parsed is not None:
            block, e, role = parsed
            blocks.add(block)
            found[(e, role)] = name
    if not found:
        raise ValueError(f"the model's layer has fused experts ({modules[0]}) but the checkpoint "
                         "holds no per-expert tensors (<block>.experts.<e>.<proj>.weight); "
                         "save the source with transformers' default save_original_format=True")
    if len(blocks) != 1:
        raise ValueError(f"per-expert tensors under several blocks: {sorted(blocks)}")
    missing = [(e, r) for e in range(num) for r in ("gate", "up", "down") if (e, r) not in found]
    extra = sorted(k for k in found if k[0] >= num)
    if missing or extra:
        raise ValueError(f"the checkpoint's experts do not match the model's {num}: missing "
                         f"{missing[:3]}, extra {extra[:3]}")
    names = tuple((found[(e, "gate")], found[(e, "up")], found[(e, "down")]) for e in range(num))
    return ExpertNames(modules[0], blocks.pop(), num, names)


def fuse(experts: ExpertNames, tensors: dict) -> dict:
    """{model name: fused tensor} of one layer's experts from per-expert `tensors` (stored names
    relative to the layer), bit for bit what transformers builds on load."""
    gate_up = torch.stack([torch.cat([tensors[g], tensors[u]], dim=0)
                           for g, u, _ in experts.names])
    down = torch.stack([tensors[d] for _, _, d in experts.names])
    return {f"{experts.module}.gate_up_proj": gate_up, f"{experts.module}.down_proj": down}


def model_experts(model: nn.Module, stored_names) -> dict[str, ExpertNames]:
    """{decoder layer prefix ("model.layers.3."): its ExpertNames} over a whole model, from the
    checkpoint's full tensor names."""
    out = {}
    stored_names = list(stored_names)
    for path, module in model.named_modules():
        if not is_experts_module(module):
            continue
        m = re.match(r"^(.*\.\d+)\.", path)
        if m is None:
            raise ValueError(f"cannot tell which decoder layer holds the experts {path}")
        prefix = m.group(1) + "."
        layer = model.get_submodule(m.group(1))
        relative = [n[len(prefix):] for n in stored_names if n.startswith(prefix)]
        if relative:  # a layer the names do not cover at all is someone else's business
            out[prefix] = find_experts(layer, relative)
    return out


def to_model_names(model: nn.Module, tensors: dict) -> dict:
    """A whole checkpoint's {stored name: tensor} as the model's state dict: experts fused,
    MoE block tensors renamed (a dense model's tensors pass unchanged)."""
    layers = model_experts(model, tensors)
    if not layers:
        return tensors
    out = dict(tensors)
    for prefix, experts in layers.items():
        local = {n: out.pop(prefix + n) for n in experts.all_names()}
        for name, t in fuse(experts, local).items():
            out[prefix + name] = t
        for name in [n for n in out if n.startswith(prefix)]:
            renamed = prefix + experts.model_name(name[len(prefix):])
            if renamed != name:
                out[renamed] = out.pop(name)
    return out


def use_eager_experts(model: nn.Module) -> None:
    """Compute experts one after the other, as transformers' reference ("eager") does and as
    Endor's routed experts do (runtime/experts.py): the default grouped matmul sums in another
    order, so greedy tokens could differ in the last bit."""
    if any(is_experts_module(m) for m in model.modules()) and \
            hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")


def model_names(model: nn.Module, stored_names) -> set[str]:
    """The model's state-dict names that a checkpoint with `stored_names` provides."""
    stored_names = set(stored_names)
    out = set(stored_names)
    for prefix, experts in model_experts(model, stored_names).items():
        out -= {prefix + n for n in experts.all_names()}
        out |= {f"{prefix}{experts.module}.gate_up_proj", f"{prefix}{experts.module}.down_proj"}
        for name in [n for n in out if n.startswith(prefix)]:
            renamed = prefix + experts.model_name(name[len(prefix):])
            if renamed != name:
                out.discard(name)
                out.add(renamed)
    return out
