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
    lfu.put("d", image(10))  # used once, as b (the least used resident): b stays
    assert set(lfu.items) == {"a", "b", "c"}
    lfu.get("d")
    lfu.put("d", image(10))  # twice now, more than b: b goes
    assert set(lfu.items) == {"a", "c", "d"}
    for _ in range(2):
        lfu.get("e")
    lfu.put("e", image(10))  # twice, as c and d (the least used): they stay
    assert set(lfu.items) == {"a", "c", "d"}
    lfu.get("e")
    lfu.put("e", image(10))  # three times: the least used, least recent (c) goes
    assert set(lfu.items) == {"a", "d", "e"}
    lfu.put("f", image(10))  # never counted: stays out
    assert "f" not in lfu.items


def test_lfu_keeps_a_hit_rate_where_lru_thrashes():
    """A cyclic sweep over 5 experts through 3 slots: LRU never hits, LFU keeps 3 of 5."""
    caches = {p: ExpertCache(30, p) for p in ("lru", "lfu")}
    hits = dict.fromkeys(caches, 0)
    for _ in range(10):
        for key in "abcde":
            for policy, cache in caches.items():
                if cache.get(key) is not None:
                    hits[policy] += 1
                else:
                    cache.put(key, torch.zeros(10, dtype=torch.uint8))
    assert hits["lru"] == 0 and hits["lfu"] == 9 * 3
    big = ExpertCache(5)
    big.put("x", torch.zeros(10, dtype=torch.uint8))  # larger than the whole cache: not kept
    assert not big.items
    with pytest.raises(ValueError, match="expert_cache"):
        ExpertCache(1, "fifo")
    with pytest.raises(ValueError, match="expert_cache"):
        load_model("unused", expert_cache="fifo")
