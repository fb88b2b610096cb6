"""Calibration statistics of one Linear layer's inputs, accumulated batch by batch.

Only sums are kept (never the activations), in float32: the squared norm of every input feature
(Wanda) and, when asked for, the Gram matrix X^T X (SparseGPT's Hessian, in_features^2 floats)."""

from __future__ import annotations

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class CalibrationStats:
    """Streaming statistics of the inputs `x` ([..., in_features]) a layer sees.

    A *sample* is one row of `x` flattened over its leading dimensions (one token).
    `col_sq_norm[j]` is the sum over samples of x_j^2; `hessian` is SparseGPT's 2/n * X^T X."""

    def __init__(self, in_features: int, *, hessian: bool, device="cpu"):
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        self.in_features = in_features
        self.with_hessian = bool(hessian)
        self.device = torch.device(device)
        self.nsamples = 0
        self.col_sq_norm = torch.zeros(in_features, dtype=torch.float32, device=self.device)
        # The raw sum X^T X; `hessian` scales it on demand so that batched and one-shot
        # accumulation differ only by float summation order.
        self._gram = (torch.zeros(in_features, in_features, dtype=torch.float32,
                                  device=self.device) if self.with_hessian else None)

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs, shape [..., in_features], any float dtype."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"CalibrationStats.update takes a torch.Tensor, got "
                            f"{type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"calibration inputs must be floating point, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"calibration inputs must have shape [..., {self.in_features}], "
                             f"got {list(x.shape)}")
        rows = x.detach().reshape(-1, self.in_features).to(self.device, torch.float32)
        if rows.shape[0] == 0:
            return
        if not bool(torch.isfinite(rows).all()):
            raise ValueError("calibration inputs contain NaN or infinity (the model overflows "
                             "in this dtype: calibrate in float32 or bfloat16)")
        self.nsamples += rows.shape[0]
        self.col_sq_norm += rows.square().sum(dim=0)
        if self._gram is not None:
            self._gram.addmm_(rows.T, rows)

    @property
    def hessian(self) -> torch.Tensor:
        """float32 [in, in]: 2/n * X^T X (a new tensor on every access)."""
        if self._gram is None:
            raise ValueError("these statistics were collected without the Hessian; create "
                             "them with CalibrationStats(in_features, hessian=True)")
        if self.nsamples == 0:
            return torch.zeros_like(self._gram)
        return self._gram * (2.0 / self.nsamples)

    @property
    def col_norm(self) -> torch.Tensor:
        """float32 [in]: ||X_j||_2 over all samples, Wanda's activation norm."""
        return self.col_sq_norm.sqrt()

    def __repr__(self) -> str:
        return (f"CalibrationStats(in_features={self.in_features}, "
                f"hessian={self.with_hessian}, nsamples={self.nsamples})")
