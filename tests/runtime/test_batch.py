"""Batched generation through the offloaded runtime (src/endor/runtime/batch.py): prompts of
different lengths, left padding and attention masks give the tokens the in-memory model gives
for the same batch."""

import pytest
import torch

from endor.runtime import open_model
from endor.runtime.batch import generate_batch, left_pad

PROMPTS = [[5, 17, 3, 44, 9, 2, 71, 30], [12, 8, 60], [33, 1, 90, 14, 7], [40]]
NEW = 5


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []], pad_id=0)


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("compute", ["dense", "fused"])
def test_batch_matches_the_in_memory_model(tiny, arch, compute):
    path, reference, _ = tiny(arch, "endor")
    want = generate_batch(reference, PROMPTS, max_new_tokens=NEW, min_new_tokens=NEW)
    with open_model(path, max_memory=0, compute=compute) as model:
        got = generate_batch(model, PROMPTS, max_new_tokens=NEW, min_new_tokens=NEW)
        stats = model.endor_stats()
    assert got == want
    # One forward per step for the whole batch: each streamed layer read once per step.
    assert stats["decode_tokens"] == NEW - 1
    # Not every row generates the same tokens, so the batch is a real check.
    assert len({tuple(t) for t in want}) > 1


def test_each_row_of_a_batch_matches_it_alone(tiny):
    path, _, _ = tiny("llama", "endor")
    with open_model(path, max_memory=0, compute="dense") as model:
        together = generate_batch(model, PROMPTS, max_new_tokens=NEW, min_new_tokens=NEW)
        alone = [generate_batch(model, [p], max_new_tokens=NEW, min_new_tokens=NEW)[0]
                 for p in PROMPTS]
    assert together == alone
