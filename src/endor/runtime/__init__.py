"""Offloaded inference: decoder layers stream from an Endor checkpoint (disk or RAM) through a
prefetch pipeline into a transformers model whose generate() works. transformers and accelerate
are imported when a model is loaded, not with this package."""

from .model import load_model, open_model
from .plan import parse_size

__all__ = ["load_model", "open_model", "parse_size"]
