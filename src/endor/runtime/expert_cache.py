"""The expert cache: compressed expert images kept in the memory budget the resident weights
leave, so popular experts are not read again. Two policies, measured against each other by
`endor bench e2e --moe` (rows endor-experts and endor-experts-lru): LRU, and LFU with use
counts kept for every expert ever looked up (so a popular expert evicted once wins its place
back, and a one-off never pushes out a popular one)."""

from __future__ import annotations

from collections import OrderedDict

import torch

POLICIES = ("lru", "lfu")


class ExpertCache:
    """Compressed expert images within `capacity` bytes; LRU or LFU (use counts kept for every
    expert seen, so a returning popular expert wins its place back)."""

    def __init__(self, capacity: int, policy: str = "lru"):
        if policy not in POLICIES:
            raise ValueError(f"expert_cache must be one of {POLICIES}, got {policy!r}")
        self.capacity, self.policy = max(int(capacity), 0), policy
        self.items: OrderedDict = OrderedDict()
        self.uses: dict = {}
        self._sizes: dict = {}
        self.nbytes = 0

    def get(self, key):
        self.uses[key] = self.uses.get(key, 0) + 1
        image = self.items.get(key)
        if image is not None:
            self.items.move_to_end(key)
        return image

    def put(self, key, image: torch.Tensor, prepare=None) -> None:
        """Keep a copy of `image` (uint8) if the policy admits it; get() then returns
        prepare(copy) (default: the copy), computed once here."""
        size = image.numel()
        if size > self.capacity or key in self.items:
            return
        while self.nbytes + size > self.capacity:
            victim = self._victim()
            if self.policy == "lfu" and self.uses[victim] >= self.uses.get(key, 0):
                # Not admitted unless used more than the least used resident: on a tie the
                # resident stays. (Evicting on ties made LFU an LRU on equal counts, which a
                # token's cyclic sweep over more experts than fit thrashes to 0 hits: measured,
                # dense experts of the bench model, 58 fit, 96 per token.)
                return
            self.nbytes -= self._sizes.pop(victim)
            del self.items[victim]
        copy = image.clone()
        self.items[key] = copy if prepare is None else prepare(copy)
        self._sizes[key] = size
        self.nbytes += size

    def _victim(self):
        if self.policy == "lru":
            return next(iter(self.items))
        return min(self.items, key=lambda k: self.uses[k])  # ties: least recent first
