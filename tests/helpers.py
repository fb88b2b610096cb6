"""Shared test helpers."""

import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def sparse_tensor(shape, dtype, sparsity, *, seed=0):
    """Random normal tensor with a random fraction `sparsity` of exact zeros."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(dtype)
    t[torch.rand(shape, generator=g) < sparsity] = 0
    return t
