"""Tiny random models, a character tokenizer and a hand-written Endor checkpoint, for tests of the
loader, perplexity and `endor eval` that need no model download and run in milliseconds."""

import string

import torch

import endor
from endor.checkpoint import CheckpointWriter

CHARS = string.printable
SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2}


def char_tokenizer(*, add_bos: bool):
    """One token per printable character; with add_bos the tokenizer puts <s> in front, the way
    Gemma's does."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {**SPECIALS, **{c: i + len(SPECIALS) for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


VOCAB_SIZE = len(SPECIALS) + len(CHARS)


def tiny_config(kind: str = "llama", *, tie: bool = True):
    from transformers import Gemma3TextConfig, LlamaConfig

    common = dict(vocab_size=VOCAB_SIZE, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "gemma3":
        return Gemma3TextConfig(**common, head_dim=8, sliding_window=4,
                                layer_types=["sliding_attention", "full_attention"])
    raise ValueError(kind)


def tiny_model(kind: str = "llama", *, tie: bool = True, dtype=torch.float32, seed: int = 0):
    """A random model whose decoder Linear weights are half zeros (exact +0.0)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, tie=tie), dtype=dtype)
    with torch.no_grad():
        for name, module in model.named_modules():
            if ".layers." in name and isinstance(module, torch.nn.Linear):
                w = module.weight
                g = torch.Generator().manual_seed(len(name))
                w.masked_fill_(torch.rand(w.shape, generator=g) < 0.5, 0.0)
    return model.eval()


def is_decoder_linear(model, name: str) -> bool:
    module_name = name.rsplit(".", 1)[0]
    return (name.endswith(".weight") and ".layers." in name
            and isinstance(model.get_submodule(module_name), torch.nn.Linear))


def write_endor_checkpoint(model, out_dir, *, tokenizer=None, weights: str = "endor",
                           drop=(), extra=None):
    """The layout of docs/FORMAT.md section 2, by hand: one shard per decoder layer (its Linear
    weights as Endor tensors), one for the rest; a tied lm_head is left out."""
    model.config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    n_layers = model.config.num_hidden_layers
    groups = [f"layers.{i}" for i in range(n_layers)] + ["rest"]
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    shards = [{} for _ in groups]
    for name, tensor in model.state_dict().items():
        if name in tied or name in drop:
            continue
        parts = name.split(".")
        i = int(parts[2]) if parts[:2] == ["model", "layers"] else n_layers
        compress = weights == "endor" and is_decoder_linear(model, name)
        shards[i][name] = endor.compress(tensor) if compress else tensor.clone()
    shards[-1].update(extra or {})
    writer = CheckpointWriter(out_dir, groups, weights=weights)
    for i, tensors in enumerate(shards):
        writer.write(i, tensors)
    writer.finish({"method": "magnitude", "sparsity": 0.5, "nm": None, "summary": {}})
    return out_dir
