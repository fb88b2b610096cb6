"""Tiny converted checkpoints for runtime tests: a random model from a transformers config,
decoder Linear weights pruned to ~50% by magnitude, written with endor.checkpoint in either
weights kind. The pruned model itself is the in-memory reference the runtime must match."""

from __future__ import annotations

import torch
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, OPTConfig,
                          Qwen2Config)

import endor
from endor.checkpoint import CheckpointWriter

SMALL = dict(vocab_size=96, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
             max_position_embeddings=64)


def tiny_config(arch: str):
    """Tiny configs of four decoder-only families: GQA (Llama, Qwen2, Gemma-3), biases and
    learned positions (OPT), sliding-window attention (Gemma-3), tied embeddings (Qwen2)."""
    if arch == "llama":
        return LlamaConfig(**SMALL, intermediate_size=64, num_key_value_heads=2,
                           tie_word_embeddings=False)
    if arch == "qwen2":
        return Qwen2Config(**SMALL, intermediate_size=64, num_key_value_heads=2,
                           tie_word_embeddings=True)
    if arch == "opt":
        return OPTConfig(**SMALL, ffn_dim=64, word_embed_proj_dim=32, tie_word_embeddings=False)
    if arch == "gemma3":
        return Gemma3TextConfig(**SMALL, intermediate_size=64, num_key_value_heads=2,
                                head_dim=8, sliding_window=4, tie_word_embeddings=False)
    raise ValueError(arch)


# Weight scales (gain / sqrt(fan_in)) at which each tiny random model generates varied tokens
# rather than one repeated token, so token identity is a meaningful check.
_GAIN = {"llama": 2.0, "qwen2": 2.0, "opt": 0.3, "gemma3": 2.0}


def pruned_model(arch: str, dtype=torch.bfloat16, *, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=dtype).eval()
    layers = _layer_prefix(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                scale = 1.0 if "embed" in name else _GAIN[arch] / p.shape[-1] ** 0.5
                p.copy_(torch.randn(p.shape) * scale)
            else:
                centre = 1.0 if "norm" in name and arch != "gemma3" else 0.0
                p.copy_(torch.randn(p.shape) * 0.1 + centre)
        for name, module in model.named_modules():
            if name.startswith(layers) and isinstance(module, torch.nn.Linear):
                w = module.weight
                k = w.shape[1] // 2  # magnitude pruning, per output row
                drop = w.float().abs().argsort(dim=1)[:, :k]
                w.scatter_(1, drop, 0.0)
    return model


def _layer_prefix(model) -> str:
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == model.config.num_hidden_layers:
            return name + "."
    raise AssertionError("no decoder layer list")


def write_checkpoint(model, out_dir, *, weights: str = "endor", values: str = "exp"):
    """The layout of docs/FORMAT.md section 2: one shard per decoder layer plus 'rest'."""
    prefix = _layer_prefix(model)
    n = model.config.num_hidden_layers
    state = model.state_dict()
    tied = set((getattr(model, "all_tied_weights_keys", None) or {}).keys())
    groups = [f"layers.{i}" for i in range(n)] + ["rest"]
    per_group = {g: {} for g in groups}
    for name, t in state.items():
        if name in tied:
            continue
        if name.startswith(prefix):
            i = int(name[len(prefix):].split(".")[0])
            compress = weights == "endor" and name.endswith(".weight") and t.dim() == 2
            per_group[f"layers.{i}"][name] = endor.compress(t, values=values) if compress \
                else t.clone()
        else:
            per_group["rest"][name] = t.clone()
    writer = CheckpointWriter(out_dir, groups, weights=weights)
    for i, g in enumerate(groups):
        # "format": "pt" lets transformers (and so Accelerate) load the dense kind directly.
        writer.write(i, per_group[g], metadata={"format": "pt"})
    model.config.save_pretrained(out_dir)
    writer.finish({"method": "magnitude", "sparsity": 0.5, "nm": None, "summary": {}})
    return out_dir


def greedy(model, prompt_ids, new_tokens: int):
    with torch.no_grad():
        out = model.generate(prompt_ids, max_new_tokens=new_tokens, do_sample=False,
                             min_new_tokens=new_tokens, pad_token_id=0)
    return out[0, prompt_ids.shape[1]:].tolist()


def save_char_tokenizer(out_dir) -> None:
    """A character-level tokenizer whose 96 ids match the tiny configs' vocabulary, built in
    code (nothing downloaded), so the CLI can be tested on text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{chr(c): c - 31 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(out_dir)
