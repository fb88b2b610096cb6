"""Test inputs for the pruning tests: correlated activations and tie-heavy weights."""

import torch


def correlated_inputs(samples: int, features: int, *, seed: int = 0) -> torch.Tensor:
    """float32 [samples, features]: low-rank mixing plus noise, with a few large-scale features,
    like a transformer's hidden states (where SparseGPT's weight update pays off)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(samples, features // 4 + 1, generator=g)
    mixing = torch.randn(features // 4 + 1, features, generator=g)
    x = latent @ mixing + 0.3 * torch.randn(samples, features, generator=g)
    scale = torch.ones(features)
    scale[torch.randperm(features, generator=g)[:max(1, features // 16)]] = 8.0
    return x * scale


def random_weight(shape, dtype=torch.float32, *, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def quantized_weight(shape, dtype=torch.float32, *, levels: int = 16, seed: int = 0):
    """Weights on `levels` evenly spaced non-zero values, as dequantized 4-bit weights are:
    every row is full of exact ties in |w|."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, levels, shape, generator=g).to(torch.float32)
    return ((codes - (levels - 1) / 2) * 0.01).to(dtype)  # levels symmetric around 0, no zero
