"""load_model's glue for mixture-of-experts decoder layers: which layers have experts, the plan
of what streams with the layer (everything but the experts, or everything when MoE layers stream
whole), resident experts, and swapping the model's experts module for RoutedExperts."""

from __future__ import annotations

import dataclasses

from torch import nn

from ..errors import FormatError
from ..format import EndorFile
from ..moe import ExpertNames, find_experts, fuse, use_eager_experts
from .plan import LayerPlan, plan_layer
from .weights import load_dense, set_tensor


def moe_layers(layers: nn.ModuleList, files: list[EndorFile],
               prefixes: list[str]) -> dict[int, ExpertNames]:
    """{decoder layer index: its experts} for the layers with fused experts."""
    out = {}
    for i, (layer, f) in enumerate(zip(layers, files)):
        stored = [n[len(prefixes[i]):] for n in f.keys() if n.startswith(prefixes[i])]
        try:
            names = find_experts(layer, stored)
        except ValueError as e:
            raise FormatError(f"decoder layer {i}: {e}", path=f.path) from None
        if names is not None:
            out[i] = names
    return out


def plan_moe_layer(index: int, f: EndorFile, prefix: str, layer: nn.Module,
                   names: ExpertNames | None, routed: bool) -> LayerPlan:
    """plan_layer for any decoder layer. An MoE layer's plan leaves its experts out when they
    are `routed` (read one by one), else it holds them under their stored names."""
    expected = {n: (t.shape, t.dtype) for n, t in layer.state_dict(keep_vars=True).items()}
    if names is None:
        return plan_layer(index, f, prefix, expected)
    fused = {f"{names.module}.gate_up_proj", f"{names.module}.down_proj"}
    gate_up = expected[f"{names.module}.gate_up_proj"]
    dtype = gate_up[1]
    inter, hidden = gate_up[0][1] // 2, gate_up[0][2]
    expected = {n: v for n, v in expected.items() if n not in fused}
    experts = set(names.all_names())
    if not routed:
        for g, u, d in names.names:
            expected.update({g: ((inter, hidden), dtype), u: ((inter, hidden), dtype),
                             d: ((hidden, inter), dtype)})

    def model_name(rel: str) -> str:
        return rel if rel in experts else names.model_name(rel)

    return plan_layer(index, f, prefix, expected, skip=experts if routed else (),
                      model_name=model_name)


def load_resident_experts(layer: nn.Module, f: EndorFile, prefix: str, names: ExpertNames, *,
                          device, backend) -> None:
    """An MoE layer kept resident whole: its experts fused and dense, as transformers holds
    them (the model's own experts module computes)."""
    module = layer.get_submodule(names.module)
    dtype = module.gate_up_proj.dtype
    tensors = {n: load_dense(f, prefix + n, dtype, device=device, backend=backend)
               for n in names.all_names()}
    for name, t in fuse(names, tensors).items():
        set_tensor(layer, name, t)


def without_experts(plan: LayerPlan, names: ExpertNames | None) -> LayerPlan:
    """The plan's tensors that are model parameters (per-expert ones are not)."""
    if names is None:
        return plan
    experts = set(names.all_names())
    return dataclasses.replace(plan, tensors=tuple(tp for tp in plan.tensors
                                                   if tp.name not in experts))


def replace_experts(layer: nn.Module, names: ExpertNames, module: nn.Module) -> None:
    parent, _, leaf = names.module.rpartition(".")
    setattr(layer.get_submodule(parent) if parent else layer, leaf, module)


__all__ = ["load_resident_experts", "moe_layers", "plan_moe_layer", "replace_experts",
           "use_eager_experts", "without_experts"]
