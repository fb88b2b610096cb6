"""Perplexity of a causal LM on a text, in non-overlapping windows.

The protocol, fixed so numbers are comparable across models, methods and runs:

* The text is tokenized once, without special tokens, and cut into consecutive non-overlapping
  windows of `window` tokens (the last one may be shorter). No window sees another's tokens.
* BOS: with `add_bos=None` a BOS token is put in front of every window exactly when the tokenizer
  itself puts one in front of a sequence (`tokenizer("x")` starts with `bos_token_id`): that is
  how the model saw text in training. Gemma's tokenizer does (Gemma degrades badly without it);
  SmolLM2's declares a BOS (`<|im_start|>`, a chat-turn marker) but does not add it, so SmolLM2
  windows go in bare. `add_bos=True/False` forces the choice.
* Scored tokens: with a BOS every text token of the window is scored (the BOS is its context);
  without, the first token of each window is context only, and the other `window - 1` are
  scored. The model therefore sees at most `window + 1` positions.
* nll is the mean negative log-likelihood (natural log, computed in float32) over all scored
  tokens of all windows; perplexity = exp(nll).
"""

from __future__ import annotations

import math

import torch
from tqdm import tqdm

LOGITS_BUDGET_BYTES = 256 * 2**20  # float32 logits of one batch; sets the batch size


def _tokenizer_adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _windows(ids: list[int], window: int, bos: int | None, max_windows: int | None):
    min_len = 1 if bos is not None else 2  # a window must score at least one token
    out = []
    for start in range(0, len(ids), window):
        chunk = ids[start:start + window]
        if len(chunk) < min_len:
            continue
        out.append(chunk if bos is None else [bos, *chunk])
        if max_windows is not None and len(out) == max_windows:
            break
    return out


def _batches(windows: list[list[int]], vocab_size: int):
    """Consecutive windows of equal length, as many per batch as the logits budget allows."""
    i = 0
    while i < len(windows):
        length = len(windows[i])
        size = max(1, LOGITS_BUDGET_BYTES // (length * vocab_size * 4))
        j = i + 1
        while j < len(windows) and j - i < size and len(windows[j]) == length:
            j += 1
        yield windows[i:j]
        i = j


def perplexity(model, tokenizer, text: str, *, window: int = 512, add_bos: bool | None = None,
               max_windows: int | None = None, progress: bool = False) -> dict:
    """Perplexity of `model` on `text` (protocol in the module docstring).

    Returns {"perplexity", "nll", "tokens" (scored), "text_tokens", "windows", "window",
    "add_bos"}."""
    if not isinstance(text, str) or not text:
        raise ValueError("text must be a non-empty string")
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window must be an integer >= 2, got {window!r}")
    if max_windows is not None and (isinstance(max_windows, bool)
                                    or not isinstance(max_windows, int) or max_windows < 1):
        raise ValueError(f"max_windows must be None or an integer >= 1, got {max_windows!r}")
    if add_bos is None:
        add_bos = _tokenizer_adds_bos(tokenizer)
    bos = None
    if add_bos:
        if tokenizer.bos_token_id is None:
            raise ValueError("add_bos=True but the tokenizer has no BOS token")
        bos = tokenizer.bos_token_id

    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    windows = _windows(ids, window, bos, max_windows)
    if not windows:
        raise ValueError(f"the text is {len(ids)} token(s) long: too short to score any")

    # Where the token ids go: the embedding's device (a streaming runtime's decoder layers may
    # sit on the meta device between uses).
    device = model.get_input_embeddings().weight.device
    vocab_size = model.config.get_text_config().vocab_size
    batches = list(_batches(windows, vocab_size))
    if progress:
        batches = tqdm(batches, desc="perplexity", unit="batch")
    nll_sum, scored = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            input_ids = torch.tensor(batch, dtype=torch.long, device=device)
            logits = model(input_ids=input_ids, use_cache=False).logits
            targets = input_ids[:, 1:]
            nll_sum += torch.nn.functional.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                reduction="sum").item()
            scored += targets.numel()
            del logits
    nll = nll_sum / scored
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": scored, "text_tokens": len(ids),
            "windows": len(windows), "window": window, "add_bos": bool(add_bos)}
