"""Models and texts shipped offline through PyPI packages (docs/SOURCES.md): nothing here reaches
the network, and importing it loads neither transformers nor any model."""

from .models import embedded_model_dir, gemma_model_dir, resolve_model
from .text import article_split, calibration_text, evaluation_text

__all__ = ["article_split", "calibration_text", "embedded_model_dir", "evaluation_text",
           "gemma_model_dir", "resolve_model"]
