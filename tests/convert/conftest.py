"""Tiny random HF model directories (config, safetensors shards + index, a real BPE tokenizer)
shared by the conversion tests. Everything is built locally: nothing is downloaded."""

import pytest
import torch

CALIB_TEXT = (
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat. "
    "def add(x, y):\n    return x + y\n\nfor i in range(10):\n    print(add(i, i * 2))\n"
    "Pruning removes the weights that matter least; calibration tells which ones those are. "
) * 12
SAMPLES, SEQLEN = 6, 24  # tiny calibration: keeps each calibrated conversion well under a second


def make_tokenizer(out_dir):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CALIB_TEXT], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>").save_pretrained(out_dir)


def tiny_config(kind: str, **overrides):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=320,
                  max_position_embeddings=128)
    if kind == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True, **overrides)
    if kind == "qwen2":  # q/k/v biases, untied head
        return Qwen2Config(**common, tie_word_embeddings=False, **overrides)
    if kind == "gemma3":  # sliding-window and global layers take different masks
        return Gemma3TextConfig(**{**common, "num_hidden_layers": 4}, head_dim=16,
                                sliding_window=8, layer_types=["sliding_attention",
                                                               "full_attention"] * 2,
                                **overrides)
    raise ValueError(kind)


def store_tied_head(path):
    """save_pretrained leaves a tied head out; some published checkpoints store it anyway."""
    import json

    from safetensors.torch import load_file, save_file

    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    embed = load_file(path / index["weight_map"]["model.embed_tokens.weight"])
    save_file({"lm_head.weight": embed["model.embed_tokens.weight"]},
              path / "head.safetensors", metadata={"format": "pt"})
    index["weight_map"]["lm_head.weight"] = "head.safetensors"
    index_path.write_text(json.dumps(index))


def make_model_dir(path, kind="llama", *, dtype=torch.float32, seed=0, tokenizer=True,
                   max_shard_size="60KB", edit=None):
    """Save a randomly initialised model (a tied head stored too, as some checkpoints do);
    `edit(model)` may change weights before saving."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms and biases: not all ones/zeros, so mistakes show
                p.add_(torch.randn_like(p) * 0.1)
        if edit is not None:
            edit(model)
    model.to(dtype).save_pretrained(path, max_shard_size=max_shard_size)
    if model.config.tie_word_embeddings:
        store_tied_head(path)
    if tokenizer:
        make_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Lazily built model directories keyed by (kind, dtype)."""
    built = {}

    def get(kind="llama", dtype=torch.float32):
        if (kind, dtype) not in built:
            built[kind, dtype] = make_model_dir(tmp_path_factory.mktemp(kind), kind, dtype=dtype)
        return built[kind, dtype]
    return get


@pytest.fixture(autouse=True)
def _tiny_models_on_one_thread(one_torch_thread):
    """These models are tiny: extra threads only add synchronisation, never speed."""
