"""The in-memory reference loader: a whole model decompressed into memory, from an Endor checkpoint
directory, a plain HF directory, a GGUF file or an embedded-model alias. The streaming runtime
must match what this returns token for token."""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import MANIFEST, Checkpoint
from .data.models import hub_offline, resolve_model
from .errors import FormatError
from .moe import model_names, to_model_names, use_eager_experts

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_in_memory(path, *, dtype=None, device="cpu"):
    """(model, tokenizer) for `path`, in eval mode on `device`.

    `path` is an Endor checkpoint directory (has endor.json; any weights kind, every tensor
    decompressed), a plain HF directory, a .gguf file or an alias ("smollm2", "gemma3-270m").
    `dtype` None keeps the stored dtype; a floating dtype casts every floating tensor to it.
    `tokenizer` is None when the directory holds no tokenizer (e.g. synthetic checkpoints).
    Code from the directory is never run (no trust_remote_code)."""
    hub_offline()
    dtype = _check_dtype(dtype)
    device = torch.device(device)
    path = resolve_model(path)
    if (path / MANIFEST).is_file():
        model = _load_endor_checkpoint(path, dtype=dtype, device=device)
    else:
        # lazy: heavy (transformers/accelerate), kept out of `import endor` and `endor --help`
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype if dtype is not None else "auto", trust_remote_code=False)
        model.to(device)
    model.eval()
    return model, load_tokenizer(path)


def load_tokenizer(path):
    """The tokenizer saved in directory `path`, or None when it holds none."""
    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    # lazy: heavy (transformers/accelerate), kept out of `import endor` and `endor --help`
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def _check_dtype(dtype):
    if dtype is None:
        return None
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None) if not dtype.startswith("_") else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (or its name), got {dtype!r}")
    return dtype


def _config_dtype(config) -> torch.dtype:
    stored = getattr(config, "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def _load_endor_checkpoint(path: Path, *, dtype, device: torch.device):
    # lazy: heavy (transformers/accelerate), kept out of `import endor` and `endor --help`
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig


    checkpoint = Checkpoint(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    # Parameters on the meta device (no memory, no random init); buffers stay real, so the
    # non-persistent ones (rotary inv_freq, Gemma's embed_scale) are computed by the model's own
    # __init__ exactly as from_pretrained computes them.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype or _config_dtype(config), trust_remote_code=False)

    expected = set(model.state_dict())
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    try:
        # MoE checkpoints store one tensor per expert; the model fuses them (endor.moe)
        stored = model_names(model, checkpoint.weight_map)
    except ValueError as e:
        raise FormatError(str(e), path=path) from None
    unexpected = sorted(stored - expected)
    if unexpected:
        raise FormatError(f"holds {len(unexpected)} tensor(s) that the model built from "
                          f"config.json does not have, e.g. {unexpected[:3]}", path=path)
    missing = sorted(expected - stored - tied)
    if missing:
        raise FormatError(f"lacks {len(missing)} tensor(s) that the model needs, e.g. "
                          f"{missing[:3]}; rerun `endor convert`", path=path)

    state = {}
    for name in sorted(checkpoint.weight_map):
        tensor = checkpoint.file_of(name).get_tensor(name, device=device)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        state[name] = tensor
    model.load_state_dict(to_model_names(model, state), strict=False, assign=True)
    use_eager_experts(model)
    model.tie_weights()  # a tied lm_head is left out of converted checkpoints
    left_on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
                    if t.is_meta]
    assert not left_on_meta, f"tensors never loaded: {left_on_meta[:3]}"
    model.to(device)  # the buffers, built on the CPU
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)
    return model
