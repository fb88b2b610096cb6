"""Endor: offloaded LLM inference with a lossless bitmap sparse format.

`import endor` touches no GPU and compiles nothing."""

from .errors import FormatError
from .format import EndorFile, EndorTensor, compress, load_file, open_file, save_file
from .integrations import lazy_hook as _lazy_hook
from .kernels import decompress

__version__ = "0.1.0"

__all__ = ["EndorFile", "EndorTensor", "FormatError", "compress", "decompress", "load_file",
           "load_model", "open_file", "save_file"]

_lazy_hook.install()  # from_pretrained on Endor checkpoints, once transformers loads (cheap)


def __getattr__(name):
    # The runtime pulls in transformers: import it only when asked for.
    if name == "load_model":
        from .runtime import load_model
        return load_model
    raise AttributeError(f"module 'endor' has no attribute {name!r}")
