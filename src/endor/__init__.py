"""Endor: offloaded LLM inference with a lossless bitmap sparse format.

`import endor` touches no GPU and compiles nothing."""

from .errors import FormatError
from .format import EndorFile, EndorTensor, compress, load_file, open_file, save_file
from .kernels import decompress  # the format's decompress, with the fast backends registered
from .runtime import load_model

__version__ = "0.1.0"

__all__ = ["EndorFile", "EndorTensor", "FormatError", "compress", "decompress", "load_file",
           "load_model", "open_file", "save_file"]
