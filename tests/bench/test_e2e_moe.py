"""`endor bench e2e --moe` (src/endor/bench/e2e_moe.py) on its quick shape: every system gives
the same tokens, the ratios and the router skew are reported."""

import argparse

import pytest
import torch

from endor.bench import e2e, e2e_moe


def _args(*argv) -> dict:
    """run()'s keyword arguments: the options as parsed, plus the common ones."""
    parser = argparse.ArgumentParser()
    e2e.add_arguments(parser)
    return vars(parser.parse_args(["--moe", *argv])) | {"quick": True, "repeat": 1, "warmup": 0}


def test_quick_moe_document(tmp_path):
    args = _args("--workdir", str(tmp_path), "--new-tokens", "3", "--moe-systems",
                 "endor-experts,endor-experts-nocache,endor-whole-layers,accelerate-cold")
    doc = e2e.run(**args)
    assert doc["benchmark"] == "e2e" and doc["params"]["moe"]
    rows = {r["system"]: r for r in doc["results"]}
    assert set(rows) == {f"{s}/{r}" for s in ("endor-experts", "endor-experts-nocache",
                                              "endor-whole-layers", "accelerate-cold")
                         for r in ("uniform", "zipf")}
    for row in rows.values():
        assert row["tokens_match"] and row["decode_tokens_per_s"] > 0
    assert rows["endor-experts/uniform"]["expert_misses"] > 0
    # without a cache, a token reads its layers' attention+router+norms and chosen experts
    # (plus the shard headers, large next to this tiny model's tensors)
    assert 1.0 <= doc["ratios"]["nocache_bytes_vs_ideal/uniform"] < 1.5
    assert rows["endor-experts-nocache/uniform"]["mb_read_per_token"] < \
        rows["endor-whole-layers/uniform"]["mb_read_per_token"]
    for key in ("experts_vs_endor-whole-layers/uniform", "experts_vs_accelerate-cold/zipf"):
        assert doc["ratios"][key] > 0


def test_zipf_router_skews_choices():
    from transformers import AutoModelForCausalLM

    config, _ = e2e_moe._config(e2e.Options(**_args()))
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config).eval()
    shares = {}
    for zipf in (0.0, 3.0):
        handles = e2e_moe.skew_routers(lm, zipf) if zipf else []
        seen, more = e2e_moe.record_choices(lm)
        with torch.no_grad():
            for _ in range(8):
                lm(torch.randint(config.vocab_size, (1, 1)))
        shares[zipf] = e2e_moe.top_decile_share(seen, config.num_experts)
        for h in [*handles, *more]:
            h.remove()
    assert shares[3.0] > shares[0.0] + 0.2


def test_bad_moe_options():
    with pytest.raises(ValueError, match="moe-systems"):
        e2e.run(**_args("--moe-systems", "nope"))
    with pytest.raises(ValueError, match="--moe runs with"):
        e2e.run(**_args("--offload", "cpu", "--device", "cuda"))


def test_random_router_draws_uniformly_and_repeatably():
    from transformers import AutoModelForCausalLM

    config, _ = e2e_moe._config(e2e.Options(**_args()))
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config).eval()
    e2e_moe.randomize_routers(lm)
    seen, _ = e2e_moe.record_choices(lm)
    token = torch.tensor([[7]])
    with torch.no_grad():
        for _ in range(2):  # the same input twice: the same draw
            lm(token)
        first = [idx for _, idx in seen]
        seen.clear()
        for _ in range(2):
            lm(token)
        assert all(torch.equal(a, b) for a, b in zip(first, (idx for _, idx in seen)))
        seen.clear()
        for t in range(40):
            lm(torch.tensor([[t]]))
    counts = torch.zeros(config.num_experts)
    for _, idx in seen:
        counts += torch.bincount(idx.flatten(), minlength=config.num_experts)
    assert (counts > 0).all() and e2e_moe.top_decile_share(seen, config.num_experts) < 0.3
