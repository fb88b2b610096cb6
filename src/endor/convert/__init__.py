"""`endor convert`: prune and compress a HuggingFace checkpoint, one decoder layer at a time.

    from endor.convert import convert
    summary = convert("smollm2", "out/", method="wanda", sparsity=0.5)

Importing this package does not import transformers; `convert` does."""

from .pipeline import convert
from .summary import format_summary

__all__ = ["convert", "format_summary"]
