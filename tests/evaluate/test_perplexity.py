import math
import sys

import pytest
import torch
import torch.nn.functional as F

from endor.evaluate import perplexity
from tests.evaluate.tiny_models import char_tokenizer, tiny_model

TEXT = ("Shakespeare, William (1564-1616), English poet, player and playwright, was baptized "
        "in the parish church of Stratford-upon-Avon in Warwickshire.\n")


def by_hand(model, ids, window, bos):
    """One window at a time, every scored token's NLL listed, then averaged."""
    nlls = []
    for start in range(0, len(ids), window):
        chunk = ids[start:start + window]
        seq = torch.tensor([([bos] if bos is not None else []) + chunk])
        if seq.shape[1] < 2:
            continue
        with torch.no_grad():
            logits = model(input_ids=seq).logits[0]
        nlls.append(F.cross_entropy(logits[:-1].float(), seq[0, 1:], reduction="none"))
    nll = torch.cat(nlls).double().mean().item()
    return nll, sum(x.numel() for x in nlls)


@pytest.mark.parametrize("window", [2, 7, 16, 1000])
@pytest.mark.parametrize("add_bos", [False, True])
def test_matches_a_hand_computation(window, add_bos):
    model, tok = tiny_model(), char_tokenizer(add_bos=add_bos)
    text = TEXT[:45]  # 45 tokens: windows of 2 leave a 1-token tail (dropped without BOS)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    result = perplexity(model, tok, text, window=window)
    assert result["add_bos"] is add_bos  # decided from the tokenizer
    nll, scored = by_hand(model, ids, window, 1 if add_bos else None)
    assert result["tokens"] == scored
    assert result["text_tokens"] == len(ids)
    assert result["windows"] == math.ceil(len(ids) / window) - (
        0 if add_bos or len(ids) % window != 1 else 1)
    assert result["nll"] == pytest.approx(nll, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)


def test_scored_token_counts():
    model, tok = tiny_model(), char_tokenizer(add_bos=False)
    n = len(TEXT)  # one token per character
    assert perplexity(model, tok, TEXT, window=10)["tokens"] == n - math.ceil(n / 10)
    assert perplexity(model, tok, TEXT, window=10, add_bos=True)["tokens"] == n
    limited = perplexity(model, tok, TEXT, window=10, add_bos=True, max_windows=3)
    assert limited["windows"] == 3 and limited["tokens"] == 30


def test_batching_does_not_change_the_result(monkeypatch):
    model, tok = tiny_model(), char_tokenizer(add_bos=True)
    batched = perplexity(model, tok, TEXT, window=9)
    # One window per batch. (The function shadows its module's name in endor.evaluate.)
    monkeypatch.setattr(sys.modules["endor.evaluate.perplexity"], "LOGITS_BUDGET_BYTES", 1)
    single = perplexity(model, tok, TEXT, window=9)
    assert single["tokens"] == batched["tokens"]
    assert single["nll"] == pytest.approx(batched["nll"], rel=1e-6)


def test_a_better_model_scores_lower():
    # Train the tiny model a few steps on the text: its perplexity on that text must fall.
    model, tok = tiny_model(), char_tokenizer(add_bos=False)
    before = perplexity(model, tok, TEXT, window=32)["perplexity"]
    ids = torch.tensor([tok(TEXT, add_special_tokens=False)["input_ids"]])
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    model.eval()
    assert perplexity(model, tok, TEXT, window=32)["perplexity"] < before / 2


def test_bad_arguments():
    model, tok = tiny_model(), char_tokenizer(add_bos=False)
    for window in (1, 0, 2.5, True, "512"):
        with pytest.raises(ValueError, match="window"):
            perplexity(model, tok, TEXT, window=window)
    with pytest.raises(ValueError, match="max_windows"):
        perplexity(model, tok, TEXT, max_windows=0)
    with pytest.raises(ValueError, match="non-empty"):
        perplexity(model, tok, "")
    with pytest.raises(ValueError, match="too short"):
        perplexity(model, tok, "a")
    tok.bos_token = None
    with pytest.raises(ValueError, match="no BOS"):
        perplexity(model, tok, TEXT, add_bos=True)


def test_streaming_runtime_scores_exactly_like_the_in_memory_model(tmp_path):
    import endor
    from endor.reference_loader import load_in_memory
    from tests.evaluate.tiny_models import write_endor_checkpoint

    write_endor_checkpoint(tiny_model("gemma3"), tmp_path, tokenizer=char_tokenizer(add_bos=True))
    model, tok = load_in_memory(tmp_path)
    streamed = endor.load_model(tmp_path, max_memory=0)  # every layer read from disk per use
    try:
        a = perplexity(model, tok, TEXT, window=16)
        b = perplexity(streamed, tok, TEXT, window=16)
    finally:
        streamed.endor_close()
    assert a == b  # same floats, bit for bit
