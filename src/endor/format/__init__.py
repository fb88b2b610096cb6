"""The on-disk and in-memory format (docs/FORMAT.md) and the decompressor contract (the backend
registry and the reference decompressor). Depends on nothing else in endor but `errors`."""

from .decompress import Backend, backends, decompress, register
from .encode import compress
from .io import EndorFile, load_file, open_file, save_file
from .tensor import EndorTensor

__all__ = ["Backend", "EndorFile", "EndorTensor", "backends", "compress", "decompress", "load_file",
           "open_file", "register", "save_file"]
