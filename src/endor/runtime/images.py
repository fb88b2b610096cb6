"""A shard image: a whole shard file read into host memory, and the views into it that the
scheduler (stream.py) and the one-time load (weights.py) both take."""

from __future__ import annotations

import torch

from ..format.io import endor_tensor
from ..format.tensor import EndorTensor
from .plan import Part, TensorPlan
from .reader import span_digests


def image_digest(image: torch.Tensor, nbytes: int) -> tuple[int, ...]:
    """The digest of a whole shard image that its later reads are checked against
    (reader.span_digests): XXH3-64 per read span, far faster than the disk."""
    return span_digests(memoryview(image.numpy()), nbytes)


def part_view(image: torch.Tensor, dense: torch.Tensor, part: Part) -> torch.Tensor:
    raw = image[part.start:part.end]
    if part.staging is not None:  # not aligned for a typed view: copy to an aligned spot first
        staged = dense[part.staging:part.staging + raw.numel()]
        staged.copy_(raw)
        raw = staged
    return raw.view(part.dtype)


def planned_tensor(tp: TensorPlan, parts: list[torch.Tensor]) -> EndorTensor:
    """The EndorTensor of a planned compressed tensor, from views of its parts (any codec)."""
    return endor_tensor(tp.entry, dict(zip(tp.suffixes, parts)), tp.version)
