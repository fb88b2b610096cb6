"""No fixed floor (src/endor/runtime/rest.py): below the non-layer weights, the embedding rows are
read on demand and the LM head streams in chunks; generation still matches the in-memory model.
The Qwen2.5-0.5B shape (hidden 896, vocab 151936, untied head) with 2 of its 24 layers runs in
a budget of 10% of its size, where the embeddings and head alone are 90% of it."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from endor.runtime import open_model
from endor.runtime.rest import OnDemandEmbedding, StreamedHead
from tests.runtime.checkpoints import greedy, write_checkpoint
from tests.conftest import NEW_TOKENS, PROMPT


def _qwen_shaped(layers: int, hidden: int = 896, vocab: int = 151936, tied: bool = False):
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=4864 * hidden
                         // 896, num_hidden_layers=layers, num_attention_heads=14,
                         num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=tied)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape) * (1.0 if "embed" in name else 2 / hidden ** 0.5))
    return model


@pytest.fixture(scope="module")
def qwen_shaped(tmp_path_factory):
    model = _qwen_shaped(2)
    path = write_checkpoint(model, tmp_path_factory.mktemp("qwen-shape"), weights="endor")
    return path, model, greedy(model, PROMPT, NEW_TOKENS)


def _size(path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


@pytest.mark.slow
def test_qwen_shape_runs_in_a_tenth_of_its_size(qwen_shaped):
    path, model, want = qwen_shaped
    budget = _size(path) // 10
    with open_model(path, max_memory=budget) as m:  # compute "auto": fused, exp values
        assert isinstance(m.get_input_embeddings(), OnDemandEmbedding)
        assert isinstance(m.get_output_embeddings(), StreamedHead)
        assert greedy(m, PROMPT, NEW_TOKENS) == want
        stats = m.endor_stats()
    assert stats["resident_bytes"] <= budget
    assert stats["resident_bytes"] + stats["buffer_host_bytes"] < 2 * budget


def test_small_budget_streams_the_head_and_reads_embedding_rows(tmp_path):
    model = _qwen_shaped(2, hidden=64, vocab=4096)
    path = write_checkpoint(model, tmp_path / "ckpt", weights="endor")
    want = greedy(model, PROMPT, NEW_TOKENS)
    rest = 2 * 4096 * 64 * 2  # embedding + head, bf16
    with open_model(path, max_memory=rest // 4) as m:
        head = m.get_output_embeddings()
        assert isinstance(head, StreamedHead) and greedy(m, PROMPT, NEW_TOKENS) == want
        assert head.bytes_read >= NEW_TOKENS * rest // 2
        stats = m.endor_stats()  # the head's reads count toward each token's bytes
        assert stats["bytes_read_per_token"] >= rest // 2
    # A budget that holds them keeps them resident, as before.
    with open_model(path, max_memory=rest * 2) as m:
        assert isinstance(m.get_output_embeddings(), torch.nn.Linear)
        assert greedy(m, PROMPT, NEW_TOKENS) == want


def _rest_file(path):
    from endor.checkpoint import Checkpoint
    from endor.runtime.weights import layer_files
    return layer_files(Checkpoint(path))[1]


def test_streamed_head_in_chunks_equals_the_dense_head(tmp_path):
    from endor.runtime import rest

    model = _qwen_shaped(1, hidden=64, vocab=1000)
    path = write_checkpoint(model, tmp_path / "ckpt", weights="endor")
    f = _rest_file(path)
    source = rest.row_source(f, "lm_head.weight", block_bytes=64 * 2 * 7)  # blocks of 7 rows
    assert source.block_rows == 7 and len(source.digests) == 143
    head = StreamedHead(source, device="cpu", chunk_bytes=64 * 2 * 7)
    assert head.chunk_rows == 7  # 1000 rows: 142 full chunks and one of 6
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    w = model.lm_head.weight.detach()
    for k in range(3):  # row by row: the same GEMV per row as the dense head's
        assert torch.equal(head(x[k:k + 1]), torch.nn.functional.linear(x[k:k + 1], w))
    emb = OnDemandEmbedding(rest.row_source(f, "model.embed_tokens.weight"), device="cpu")
    ids = torch.tensor([[5, 999, 5, 0]])
    assert torch.equal(emb(ids), model.model.embed_tokens.weight.detach()[ids])
    with pytest.raises(IndexError):
        emb(torch.tensor([1000]))


def _flip(path, name, row=0):
    """XOR one byte of row `row` of tensor `name` in the shard holding it, in place."""
    stored = _rest_file(path).header.tensors[name]
    at = stored.start + row * (stored.end - stored.start) // stored.shape[0]
    with open(_rest_file(path).path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize("name", ["model.embed_tokens.weight", "lm_head.weight"])
def test_rows_changed_after_load_are_a_clean_error(tmp_path, name):
    """The embedding rows and head chunks read for every token are checked against the digests
    taken at load: a byte changed on disk afterwards is a FormatError naming the shard, never
    other weights (the row of a prompt token, for the embedding)."""
    import endor

    model = _qwen_shaped(2, hidden=64, vocab=4096)
    path = write_checkpoint(model, tmp_path / "ckpt", weights="endor")
    want = greedy(model, PROMPT, NEW_TOKENS)
    with open_model(path, max_memory=2 * 4096 * 64 * 2 // 4) as m:
        assert isinstance(m.get_input_embeddings(), OnDemandEmbedding)
        assert greedy(m, PROMPT, NEW_TOKENS) == want
        row = int(PROMPT[0, 0]) if "embed" in name else 4095
        _flip(path, name, row)
        with pytest.raises(endor.FormatError, match="checksum mismatch") as e:
            greedy(m, PROMPT, NEW_TOKENS)
        assert ".safetensors" in str(e.value) and name in str(e.value)
        os.truncate(_rest_file(path).path, _rest_file(path).header.tensors[name].start + 64)
        with pytest.raises(endor.FormatError, match="truncated"):
            greedy(m, PROMPT, NEW_TOKENS)


def test_corrupt_rows_are_refused_at_load(tmp_path):
    """An embedding kept on disk is checked against its stored checksum when the model loads."""
    import endor

    model = _qwen_shaped(1, hidden=64, vocab=4096)
    path = write_checkpoint(model, tmp_path / "ckpt", weights="endor")
    _flip(path, "model.embed_tokens.weight", 1234)
    with pytest.raises(endor.FormatError, match="embed_tokens.*checksum mismatch"):
        with open_model(path, max_memory=2 * 4096 * 64 * 2 // 4):
            pass


def test_a_tied_pair_is_verified_once_and_streams_for_both(tmp_path, monkeypatch):
    from endor.runtime import rest
    model = _qwen_shaped(2, hidden=64, vocab=4096, tied=True)
    path = write_checkpoint(model, tmp_path / "ckpt", weights="endor")
    want = greedy(model, PROMPT, NEW_TOKENS)
    verified = []
    real = rest.verified_source
    monkeypatch.setattr(rest, "verified_source",
                        lambda source, *a, **k: verified.append(source.name) or real(source, *a,
                                                                                      **k))
    with open_model(path, max_memory=4096 * 64 * 2 // 4) as m:
        assert isinstance(m.get_input_embeddings(), OnDemandEmbedding)
        assert isinstance(m.get_output_embeddings(), StreamedHead)
        assert greedy(m, PROMPT, NEW_TOKENS) == want
    assert len(verified) == 1, verified
