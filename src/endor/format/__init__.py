"""The on-disk and in-memory format (docs/FORMAT.md). Depends on nothing else in endor."""

from .encode import compress
from .io import EndorFile, load_file, open_file, save_file
from .tensor import EndorTensor

__all__ = ["EndorFile", "EndorTensor", "compress", "load_file", "open_file", "save_file"]
