"""endor.runtime.budget.least_budget: the smallest max_memory load_model accepts, checked
against load_model itself (it runs there and generates the in-memory model's tokens, and one
byte less is refused)."""

import pytest

from endor.runtime import open_model
from endor.runtime.budget import least_budget
from tests.conftest import NEW_TOKENS, PROMPT
from tests.runtime.checkpoints import greedy


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # untied head; tied embeddings
def test_least_budget_is_what_load_model_needs(tiny, arch):
    path, _, want = tiny(arch, "endor")
    least = least_budget(path)
    assert 0 < least.bytes < least.rest_resident_bytes  # below the embeddings and head
    assert least.head_buffer_bytes > 0 and least.offloaded
    with open_model(path, max_memory=least.bytes) as model:
        assert greedy(model, PROMPT, NEW_TOKENS) == want
        stats = model.endor_stats()
        assert stats["resident_layers"] == [] and stats["resident_bytes"] <= least.bytes
        assert model.get_output_embeddings().buffer_bytes == least.head_buffer_bytes
    with pytest.raises(ValueError, match="max_memory"):
        open_model(path, max_memory=least.bytes - 1).__enter__()


def test_least_budget_of_a_model_whose_head_has_a_bias(tiny):
    """OPT's embeddings can leave; nothing it cannot offload is left out of the count."""
    path, _, _ = tiny("opt", "endor")
    least = least_budget(path)
    with open_model(path, max_memory=least.bytes) as model:
        assert model.endor_stats()["resident_bytes"] <= least.bytes
    with pytest.raises(ValueError, match="max_memory"):
        open_model(path, max_memory=least.bytes - 1).__enter__()
