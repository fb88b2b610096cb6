"""Several prompts at once through the offloaded runtime: one forward per step for the whole
batch, so each streamed layer is read once per step, not once per prompt (FlexGen's regime)."""

from __future__ import annotations

import torch


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists of any lengths -> (input_ids, attention_mask), both [B, longest], padded
    on the left as decoder-only generation needs (every prompt ends at the last column)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), longest), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, longest - len(p):] = 1
    return ids, mask


def generate_batch(model, prompts: list[list[int]], *, max_new_tokens: int, pad_id: int = 0,
                   **generate_kwargs) -> list[list[int]]:
    """Greedy continuation of every prompt (a list of token-id lists); returns the new tokens of
    each, in order. Works on any model with generate(), the offloaded one included."""
    ids, mask = left_pad(prompts, pad_id)
    device = getattr(model, "device", torch.device("cpu"))
    with torch.no_grad():
        out = model.generate(ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                             **generate_kwargs)
    return [row[ids.shape[1]:].tolist() for row in out.cpu()]
