import os

import pytest
import torch

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without a GPU, Triton kernels run under its interpreter; the variable must be set before
# anything (transformers included) imports triton, so it is set here, not per test.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The tiny models of the runtime and baseline tests (tests/runtime/checkpoints.py).
DTYPE = {"llama": torch.bfloat16, "qwen2": torch.float16, "opt": torch.float32,
         "gemma3": torch.bfloat16}
PROMPT = torch.tensor([[5, 17, 3, 44, 9, 2, 71, 30]])
NEW_TOKENS = 6


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(arch, weights) -> (checkpoint dir, pruned in-memory model, its greedy tokens);
    built once per session."""
    # Imported here: it pulls in transformers, which tests that never ask for `tiny` don't need.
    from tests.runtime.checkpoints import greedy, pruned_model, write_checkpoint
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


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test, restored afterwards. Tiny models and the mask selection
    gain nothing from more threads and lose at their barriers on a busy 2-core machine (several
    times slower measured there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
