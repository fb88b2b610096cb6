import pytest
import torch
from torch import nn

from endor.convert import calibrate
from endor.prune import CalibrationStats
from tests.convert.conftest import tiny_config


def test_segments_spread_over_the_whole_text():
    ids = torch.arange(1000)
    seg = calibrate.segments(ids, 4, 100)
    assert seg.shape == (4, 100)
    assert seg[0, 0] == 0 and seg[-1, -1] == 999  # first and last tokens are covered
    starts = seg[:, 0].tolist()
    assert starts == sorted(starts) and len(set(starts)) == 4
    assert all(torch.equal(s, torch.arange(s[0], s[0] + 100)) for s in seg)


def test_segments_shrink_for_short_texts_and_refuse_tiny_ones():
    assert calibrate.segments(torch.arange(250), 64, 100).shape == (2, 100)
    assert calibrate.segments(torch.arange(100), 3, 100).shape == (1, 100)
    with pytest.raises(ValueError, match="fewer than one segment"):
        calibrate.segments(torch.arange(99), 3, 100)
    with pytest.raises(ValueError, match="at least one"):
        calibrate.segments(torch.arange(99), 0, 10)


def full_model(kind):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(kind), dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_replayed_layers_reproduce_the_model_forward(kind):
    """Capturing each layer's arguments once and replaying the layers one by one gives exactly
    what the model computes (Gemma 3: sliding-window and global layers get different masks)."""
    model = full_model(kind)
    layers = model.model.layers
    tokens = torch.randint(0, 300, (3, 24), generator=torch.Generator().manual_seed(0))
    hidden, calls = calibrate.capture_inputs(model, layers, tokens)
    assert all(isinstance(layer, type(layers[0])) for layer in layers)  # put back
    assert len(hidden) == 3 and len(calls) == len(layers)
    for layer, call in zip(layers, calls):
        hidden = calibrate.propagate(layer, call, hidden)
    seen = []
    hook = model.model.norm.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        for seg in tokens:
            model(input_ids=seg[None], use_cache=False)
    hook.remove()
    for got, want in zip(hidden, seen):
        assert torch.equal(got, want)
    if kind == "gemma3":
        masks = [c.kwargs.get("attention_mask") for c in calls]
        assert not (masks[0] is None and masks[1] is None) and not (
            masks[0] is not None and masks[1] is not None and torch.equal(masks[0], masks[1]))


def test_linears_fed_the_same_input_share_statistics():
    model = full_model("llama")
    layer = model.model.layers[0]
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    hidden, calls = calibrate.capture_inputs(model, model.model.layers, tokens)
    targets = {f"{n}.weight": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    stats = calibrate.collect_stats(layer, calls[0], hidden, targets, hessian=True)
    q, k, v = (stats[f"self_attn.{p}_proj.weight"] for p in "qkv")
    assert q is k is v and stats["mlp.gate_proj.weight"] is stats["mlp.up_proj.weight"]
    assert stats["self_attn.o_proj.weight"] is not q and stats["mlp.down_proj.weight"] is not q

    # each shared accumulator equals one fed separately with that Linear's own inputs
    for name, module in targets.items():
        alone = CalibrationStats(module.in_features, hessian=True)
        handle = module.register_forward_pre_hook(lambda m, args: alone.update(args[0]))
        calibrate.propagate(layer, calls[0], hidden)
        handle.remove()
        assert stats[name].nsamples == alone.nsamples == 32
        assert torch.equal(stats[name].col_sq_norm, alone.col_sq_norm)
        assert torch.equal(stats[name].hessian, alone.hessian)


def test_a_linear_the_layer_never_calls_is_an_error():
    model = full_model("llama")
    layer = model.model.layers[0]
    tokens = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(2))
    hidden, calls = calibrate.capture_inputs(model, model.model.layers, tokens)
    with pytest.raises(RuntimeError, match="never called"):
        calibrate.collect_stats(layer, calls[0], hidden, {"extra.weight": nn.Linear(4, 4)},
                                hessian=False)
