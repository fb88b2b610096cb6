"""Endor: offloaded LLM inference with a lossless bitmap sparse format.

`import endor` touches no GPU and compiles nothing; it does not even import torch until a name
that needs it is used, so the `endor` command answers Ctrl-C from its first instant (the CLI
catches it; an import already under way could not be interrupted cleanly)."""

from .errors import FormatError
from .integrations import lazy_hook as _lazy_hook

__version__ = "0.1.0"

__all__ = ["EndorFile", "EndorTensor", "FormatError", "compress", "decompress", "load_file",
           "load_model", "open_file", "save_file"]

_LAZY = {"EndorFile": ".format", "EndorTensor": ".format", "compress": ".format",
         "load_file": ".format", "open_file": ".format", "save_file": ".format",
         "decompress": ".kernels", "load_model": ".runtime"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # once: later lookups do not come here
        return value
    raise AttributeError(f"module 'endor' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])


_lazy_hook.install()  # from_pretrained on Endor checkpoints, once transformers loads (cheap)
