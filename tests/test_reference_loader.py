import json

import pytest
import torch

from endor import FormatError
from endor.reference_loader import load_in_memory
from tests.evaluate.tiny_models import char_tokenizer, tiny_model, write_endor_checkpoint
from endor.format.equal import bit_equal
from tests.helpers import DTYPES


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert bit_equal(sa[name], sb[name]), name
    for (na, ba), (nb, bb) in zip(a.named_buffers(), b.named_buffers(), strict=True):
        assert na == nb and bit_equal(ba, bb), na
    x = torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        la, lb = a(input_ids=x).logits, b(input_ids=x).logits
    assert bit_equal(la, lb)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,tie", [("llama", True), ("llama", False), ("gemma3", True)])
def test_endor_checkpoint_is_the_original_model_bit_for_bit(tmp_path, kind, tie, dtype):
    original = tiny_model(kind, tie=tie, dtype=dtype)
    write_endor_checkpoint(original, tmp_path, tokenizer=char_tokenizer(add_bos=False))
    loaded, tokenizer = load_in_memory(tmp_path)
    assert not loaded.training and loaded.dtype == dtype
    assert_same_model(original, loaded)
    assert tokenizer("ab", add_special_tokens=False)["input_ids"] == [13, 14]
    if tie:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_dense_weights_kind_loads_too(tmp_path):
    original = tiny_model(dtype=torch.bfloat16)
    write_endor_checkpoint(original, tmp_path, weights="dense")
    assert_same_model(original, load_in_memory(tmp_path)[0])


def test_dtype_casts_like_from_pretrained(tmp_path):
    # Buffers (Gemma's embed_scale) are computed in the requested dtype, not cast from bf16.
    original = tiny_model("gemma3", dtype=torch.bfloat16)
    write_endor_checkpoint(original, tmp_path / "endor")
    original.save_pretrained(tmp_path / "hf")
    loaded, tokenizer = load_in_memory(tmp_path / "endor", dtype="float32")
    assert tokenizer is None  # none was saved
    assert loaded.dtype == torch.float32
    assert_same_model(load_in_memory(tmp_path / "hf", dtype=torch.float32)[0], loaded)


def test_plain_hf_directory(tmp_path):
    original = tiny_model(dtype=torch.float16)
    original.save_pretrained(tmp_path)
    char_tokenizer(add_bos=True).save_pretrained(tmp_path)
    loaded, tokenizer = load_in_memory(str(tmp_path))
    assert_same_model(original, loaded)
    assert tokenizer("a")["input_ids"] == [1, 13]


def test_missing_tensor_is_a_format_error(tmp_path):
    original = tiny_model()
    write_endor_checkpoint(original, tmp_path, drop={"model.layers.1.mlp.up_proj.weight"})
    with pytest.raises(FormatError, match="up_proj"):
        load_in_memory(tmp_path)


def test_unexpected_tensor_is_a_format_error(tmp_path):
    original = tiny_model()
    write_endor_checkpoint(original, tmp_path, extra={"model.surprise": torch.zeros(3)})
    with pytest.raises(FormatError, match="model.surprise"):
        load_in_memory(tmp_path)


def test_config_that_disagrees_with_the_shards_is_rejected(tmp_path):
    write_endor_checkpoint(tiny_model(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="model.layers.2"):
        load_in_memory(tmp_path)


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        load_in_memory(tmp_path / "nowhere")
    with pytest.raises(TypeError, match="dtype"):
        load_in_memory(tmp_path, dtype=torch.int8)
    with pytest.raises(TypeError, match="dtype"):
        load_in_memory(tmp_path, dtype="__class__")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_in_memory(tmp_path)  # an empty directory
