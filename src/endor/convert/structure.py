"""What a model is made of, learned from the model itself built on the meta device (no weights):
where its decoder layers are, which of their weights belong to nn.Linear modules (the ones Endor
prunes and compresses), and which parameters transformers ties together."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import FormatError
from ..moe import is_experts_module, parse_expert_name


@dataclass
class ModelLayout:
    model: nn.Module  # parameters on meta, buffers real (rotary tables etc.)
    layers_prefix: str  # e.g. "model.layers"
    num_layers: int
    linear_weights: frozenset  # full names of the decoder layers' nn.Linear weights
    tied: dict  # tied parameter name -> the name it is tied to (transformers' mapping)
    moe_layers: frozenset = frozenset()  # decoder layers with fused experts (endor.moe)

    def layer_of(self, name: str) -> int | None:
        """The decoder layer a tensor name belongs to, or None (embeddings, final norm, head)."""
        m = re.match(re.escape(self.layers_prefix) + r"\.(\d+)\.", name)
        if m is None or int(m.group(1)) >= self.num_layers:
            return None
        return int(m.group(1))

    def layer_type(self, name: str) -> str:
        """`model.layers.3.self_attn.q_proj.weight` -> `self_attn.q_proj`; experts collapse:
        `model.layers.3.mlp.experts.7.up_proj.weight` -> `mlp.experts.*.up_proj`."""
        inner = re.sub("^" + re.escape(self.layers_prefix) + r"\.\d+\.", "", name)
        inner = re.sub(r"\.experts\.\d+\.", ".experts.*.", inner)
        return inner.removesuffix(".weight")

    def is_expert_weight(self, name: str) -> bool:
        """A per-expert projection of an MoE decoder layer, as checkpoints store them
        (`...layers.3.mlp.experts.7.up_proj.weight`): 2-D, pruned and compressed like a Linear."""
        return self.layer_of(name) in self.moe_layers and parse_expert_name(name) is not None

    def layer(self, i: int) -> nn.Module:
        return self.model.get_submodule(f"{self.layers_prefix}.{i}")


def load_config(src: Path):
    # lazy: heavy (transformers/accelerate), kept out of `import endor` and `endor --help`
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(str(src), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise FormatError(f"config.json cannot be read by transformers: {e}", path=src) from None


def _model_class(config):
    # lazy: heavy (transformers/accelerate), kept out of `import endor` and `endor --help`
    import transformers
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM


def build_layout(config, *, dtype: torch.dtype = torch.float32) -> ModelLayout:
    """The model of `config` with parameters on meta (built in about a second whatever its size)
    and its decoder structure."""
    # lazy: heavy (transformers/accelerate), kept out of `import endor` and `endor --help`
    from accelerate import init_empty_weights

    cls = _model_class(config)
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config, dtype=dtype) if hasattr(cls, "from_config") \
            else cls._from_config(config, dtype=dtype)
    model.eval()
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_layers = getattr(text_config, "num_hidden_layers", None)
    candidates = [name for name, m in model.named_modules()
                  if isinstance(m, nn.ModuleList) and num_layers and len(m) == num_layers]
    if len(candidates) != 1:
        raise ValueError(f"cannot tell the decoder layers of {cls.__name__} apart: expected one "
                         f"list of {num_layers} modules, found {candidates or 'none'}")
    prefix = candidates[0]
    linear = frozenset(
        f"{prefix}.{i}.{sub}.weight"
        for i, layer in enumerate(model.get_submodule(prefix))
        for sub, m in layer.named_modules() if isinstance(m, nn.Linear))
    tied = {}
    if hasattr(model, "get_expanded_tied_weights_keys"):
        tied = dict(model.get_expanded_tied_weights_keys(all_submodels=True))
    moe = frozenset(i for i, layer in enumerate(model.get_submodule(prefix))
                    if any(is_experts_module(m) for m in layer.modules()))
    return ModelLayout(model, prefix, num_layers, linear, tied, moe)
