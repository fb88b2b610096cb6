"""The one bit-exactness check: lossless means the same bits, never "close"."""

import numpy as np
import torch

from .spec import INT_OF_SIZE


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (NaN payloads and -0.0 included), on any devices."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    view = INT_OF_SIZE[a.element_size()]
    a, b = a.contiguous().view(view), b.contiguous().view(view)
    if a.device != b.device:
        a, b = a.cpu(), b.cpu()
    if a.device.type == "cpu":
        return bool(np.array_equal(a.numpy(), b.numpy()))  # single pass, no thread start-up
    return torch.equal(a, b)
