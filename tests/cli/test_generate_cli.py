import json
import shutil

import pytest
import torch

from endor.cli import main
from tests.runtime.checkpoints import (greedy, pruned_model, save_char_tokenizer,
                                       write_checkpoint)

PROMPT = "Hello, Endor"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from transformers import AutoTokenizer

    model = pruned_model("llama", torch.bfloat16)
    path = write_checkpoint(model, tmp_path_factory.mktemp("ckpt"), weights="endor")
    save_char_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    return path, greedy(model, ids, 5), tokenizer


def test_json_output_is_one_object_with_the_reference_tokens(checkpoint, capsys):
    path, want, tokenizer = checkpoint
    code = main(["generate", str(path), "--prompt", PROMPT, "--max-new-tokens", "5",
                 "--max-memory", "0", "--prefetch", "2", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)  # exactly one JSON document
    assert out["tokens"] == want
    assert out["text"] == tokenizer.decode(want)
    assert out["decode_tokens_per_s"] > 0 and out["prefill_s"] > 0
    assert out["bytes_read_per_token"] > 0
    assert set(out["split_s_per_token"]) >= {"read", "decompress", "compute", "stall"}


def test_text_is_streamed_then_the_report(checkpoint, capsys):
    path, want, tokenizer = checkpoint
    code = main(["generate", str(path), "--prompt", PROMPT, "--max-new-tokens", "5",
                 "--max-memory", "0", "--offload", "cpu"])
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(PROMPT + tokenizer.decode(want))
    assert "tokens/s" in captured.err and "MB/token" in captured.err
    assert "busy ms/token" in captured.err


def test_errors_before_generation(checkpoint, tmp_path, capsys):
    path, _, _ = checkpoint
    assert main(["generate", str(path), "--prompt", "x", "--max-memory", "100B"]) == 1
    assert "smaller than the weights outside the decoder layers" in capsys.readouterr().err
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(path, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*"))
    assert main(["generate", str(no_tokenizer), "--prompt", "x"]) == 1
    assert "tokenizer" in capsys.readouterr().err
    broken = shutil.copytree(path, tmp_path / "broken")
    (broken / "endor.json").unlink()
    assert main(["generate", str(broken), "--prompt", "x"]) == 1
    assert "HuggingFace model directory" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [[], ["--expert-cache", "lru"], ["--whole-layers"]])
def test_a_moe_checkpoint_generates_the_reference_tokens(tmp_path, capsys, extra):
    from endor.convert import convert
    from endor.reference_loader import load_in_memory
    from tests.moe_models import save_moe

    save_moe("qwen2_moe", tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "out", method="magnitude", sparsity=0.5, progress=False)
    save_char_tokenizer(tmp_path / "out")
    reference, tokenizer = load_in_memory(tmp_path / "out")
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():  # as the CLI: greedy, ends at the config's EOS token
        want = reference.generate(ids, max_new_tokens=5, do_sample=False)[0, ids.shape[1]:]
    code = main(["generate", str(tmp_path / "out"), "--prompt", PROMPT, "--max-new-tokens", "5",
                 "--max-memory", "1MB", *extra])
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(PROMPT + tokenizer.decode(want))
    assert ("experts:" in captured.err) != ("--whole-layers" in extra)
