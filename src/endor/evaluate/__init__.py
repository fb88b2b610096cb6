"""Quality evaluation of a loaded model (perplexity on held-out text)."""

from .perplexity import perplexity

__all__ = ["perplexity"]
