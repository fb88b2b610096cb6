import pytest
import torch

from endor.runtime import load_model
from endor.runtime.expert_cache import ExpertCache


def test_expert_cache_policies():
    def image(n):
        return torch.zeros(n, dtype=torch.uint8)

    lru = ExpertCache(30, "lru")
    for key in "abc":
        lru.get(key)
        lru.put(key, image(10))
    lru.get("a")  # a is now the most recent
    lru.get("d")
    lru.put("d", image(10))
    assert set(lru.items) == {"a", "c", "d"} and lru.nbytes == 30

    lfu = ExpertCache(30, "lfu")
    for key, uses in (("a", 3), ("b", 1), ("c", 2)):
        for _ in range(uses):
            lfu.get(key)
        lfu.put(key, image(10))
    lfu.get("d")
    lfu.put("d", image(10))  # used once, as b: b (least used, least recent) goes
    assert set(lfu.items) == {"a", "c", "d"}
    lfu.get("e")
    lfu.put("e", image(10))  # once; the least used resident (d) has as many: replaced
    lfu.put("f", image(10))  # never counted: c and a are used more, f stays out
    assert "f" not in lfu.items
    big = ExpertCache(5)
    big.put("x", image(10))  # larger than the whole cache: not kept
    assert not big.items
    with pytest.raises(ValueError, match="expert_cache"):
        ExpertCache(1, "fifo")
    with pytest.raises(ValueError, match="expert_cache"):
        load_model("unused", expert_cache="fifo")
