"""The one bit-exactness check: lossless means the same bits, never "close"."""

import numpy as np
import torch

from .spec import INT_OF_SIZE

_CHUNK = 1 << 22  # elements


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
        # numpy (no thread start-up), in chunks: no whole-tensor bool temporary (235 MB for a
        # 70B model's MLP weight)
        x, y = a.reshape(-1).numpy(), b.reshape(-1).numpy()
        return all(np.array_equal(x[i:i + _CHUNK], y[i:i + _CHUNK])
                   for i in range(0, x.size, _CHUNK))
    return torch.equal(a, b)
