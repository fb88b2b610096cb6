import pytest
import torch

from tests.runtime.checkpoints import greedy, pruned_model, write_checkpoint

DTYPE = {"llama": torch.bfloat16, "qwen2": torch.float16, "opt": torch.float32,
         "gemma3": torch.bfloat16}
PROMPT = torch.tensor([[5, 17, 3, 44, 9, 2, 71, 30]])
NEW_TOKENS = 6


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(arch, weights) -> (checkpoint dir, pruned in-memory model, its greedy tokens);
    built once per session."""
    cache = {}

    def get(arch: str, weights: str = "endor"):
        if arch not in cache:
            model = pruned_model(arch, DTYPE[arch])
            cache[arch] = (model, greedy(model, PROMPT, NEW_TOKENS), {})
        model, tokens, dirs = cache[arch]
        if weights not in dirs:
            dirs[weights] = write_checkpoint(model, tmp_path_factory.mktemp(f"{arch}-{weights}"),
                                             weights=weights)
        return dirs[weights], model, tokens

    return get
