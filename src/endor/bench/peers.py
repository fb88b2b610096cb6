"""The formats Endor is compared with, each as encode / decode / stored bytes, lossless.

* `csr`, `coo`: torch.sparse. They run on the same-width integer view of the tensor, so a -0.0 or
  a NaN is an ordinary non-zero and the round trip is bit-exact for every input. CSR keeps int32
  indices (what scipy and cuSPARSE store when they fit); torch's COO only takes int64.
* `ct-bitmask`: compressed-tensors' `sparse-bitmask` format (bitmap + values + row offsets), run
  through the library's own code on the float tensor, exactly as it compresses a checkpoint. Its
  test is `tensor != 0`, so it is exact when every zero is +0.0 (what pruning writes); a -0.0
  comes back as +0.0.
* `zstd` (level 3) and `lz4` (frame, default level): general-purpose lossless compressors of the
  dense bytes.
* `zipnn`: ZipNN (byte grouping + Huffman/zstd), the compressor made for model weights; lossless
  for every dtype when given a copy (it rewrites the sign bits of its input in place).

Importing this module imports none of the optional libraries; `available()` says which are here.
"""

from __future__ import annotations

import importlib.util
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..format import spec


@dataclass(frozen=True)
class Peer:
    name: str
    description: str
    encode: Callable[[torch.Tensor], object]  # dense tensor -> encoded object
    decode: Callable[[object], torch.Tensor]  # encoded object -> dense tensor (fresh)
    nbytes: Callable[[object], int]  # every stored byte of the encoded object
    available: Callable[[], bool]
    # False: the library is known not to round-trip every input bit-exactly; its rows are kept
    # (flagged lossless: false) instead of stopping the benchmark.
    must_be_exact: bool = True


def _int_view(t: torch.Tensor) -> torch.Tensor:
    if t.dtype not in spec.INT_VIEW:
        raise TypeError(f"peer formats take float32/float16/bfloat16 tensors, got {t.dtype}")
    return t.detach().contiguous().view(spec.INT_VIEW[t.dtype])


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """Rows x last dimension, the 2-D layout CSR and compressed-tensors store (a vector or a
    scalar becomes one row)."""
    cols = t.shape[-1] if t.dim() else 1
    return t.reshape(math.prod(t.shape[:-1]) if t.dim() else 1, cols)


def _tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --- torch.sparse --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Sparse:
    sparse: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype


def _csr_encode(t: torch.Tensor) -> _Sparse:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CSR support is in beta", "invariant checks disabled"
        csr = _as_matrix(_int_view(t)).to_sparse_csr()
        csr = torch.sparse_csr_tensor(csr.crow_indices().to(torch.int32),
                                      csr.col_indices().to(torch.int32), csr.values(), csr.shape)
    return _Sparse(csr, t.shape, t.dtype)


def _csr_nbytes(e: _Sparse) -> int:
    return _tensor_bytes(e.sparse.crow_indices(), e.sparse.col_indices(), e.sparse.values())


def _coo_encode(t: torch.Tensor) -> _Sparse:
    return _Sparse(_int_view(t).to_sparse_coo().coalesce(), t.shape, t.dtype)


def _coo_nbytes(e: _Sparse) -> int:
    return _tensor_bytes(e.sparse.indices(), e.sparse.values())


def _sparse_decode(e: _Sparse) -> torch.Tensor:
    return e.sparse.to_dense().view(e.dtype).view(e.shape)


# --- compressed-tensors sparse-bitmask ----------------------------------------------------------

def _ct_functions():
    """(bitmask_compress, bitmask_decompress, origin). compressed-tensors <= 0.12 ships the
    `sparse-bitmask` compressor's two functions; later releases keep only the format's config and
    its bit (un)packing helpers, so the compressor's few lines of glue are restated here around
    them, as they were in the library."""
    try:  # lazy: optional (the bench extra)
        from compressed_tensors.compressors.sparse_compressors.sparse_bitmask import (
            bitmask_compress, bitmask_decompress)
        return bitmask_compress, bitmask_decompress, "compressed_tensors sparse_bitmask"
    except ImportError:
        pass
    from compressed_tensors.utils.helpers import pack_bitmasks, unpack_bitmasks

    def bitmask_compress(tensor):
        bytemasks = tensor != 0
        row_counts = bytemasks.sum(dim=-1)
        row_offsets = torch.cumsum(row_counts, 0) - row_counts
        return tensor[bytemasks], pack_bitmasks(bytemasks), row_offsets

    def bitmask_decompress(values, bitmasks, original_shape):
        bytemasks_unpacked = unpack_bitmasks(bitmasks, original_shape)
        decompressed = torch.zeros(original_shape, dtype=values.dtype)
        decompressed[bytemasks_unpacked] = values
        return decompressed

    return bitmask_compress, bitmask_decompress, "compressed_tensors.utils.helpers pack/unpack"


def ct_origin() -> str:
    """Which compressed-tensors code the `ct-bitmask` peer runs (recorded in results)."""
    # lazy: optional (the bench extra)
    import compressed_tensors
    return f"{_ct_functions()[2]} (compressed-tensors {compressed_tensors.__version__})"


@dataclass(frozen=True)
class _Bitmask:
    values: torch.Tensor
    bitmask: torch.Tensor
    row_offsets: torch.Tensor
    stored_shape: torch.Tensor  # the format stores the shape as a tensor too
    shape: torch.Size


def _ct_encode(t: torch.Tensor) -> _Bitmask:
    if t.dtype not in spec.INT_VIEW:
        raise TypeError(f"peer formats take float32/float16/bfloat16 tensors, got {t.dtype}")
    matrix = _as_matrix(t.detach().contiguous())
    values, bitmask, row_offsets = _ct_functions()[0](matrix)
    return _Bitmask(values, bitmask, row_offsets, torch.tensor(list(matrix.shape)), t.shape)


def _ct_decode(e: _Bitmask) -> torch.Tensor:
    shape = torch.Size(e.stored_shape.tolist())
    return _ct_functions()[1](e.values, e.bitmask, shape).view(e.shape)


def _ct_nbytes(e: _Bitmask) -> int:
    return _tensor_bytes(e.values, e.bitmask, e.row_offsets, e.stored_shape)


# --- general-purpose byte compressors -----------------------------------------------------------

@dataclass(frozen=True)
class _Blob:
    data: bytes
    shape: torch.Size
    dtype: torch.dtype


def _dense_bytes(t: torch.Tensor):
    return _int_view(t).view(-1).view(torch.uint8).numpy()


def _from_bytes(data: bytes, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only buffer: the tensor is only read
        return torch.frombuffer(data, dtype=torch.uint8).view(dtype).view(shape)


def _zstd_encode(t: torch.Tensor) -> _Blob:
    # lazy: optional (the bench extra)
    import zstandard
    return _Blob(zstandard.ZstdCompressor(level=3).compress(_dense_bytes(t)), t.shape, t.dtype)


def _zstd_decode(e: _Blob) -> torch.Tensor:
    # lazy: optional (the bench extra)
    import zstandard
    return _from_bytes(zstandard.ZstdDecompressor().decompress(e.data), e.shape, e.dtype)


def _lz4_encode(t: torch.Tensor) -> _Blob:
    # lazy: optional (the bench extra)
    import lz4.frame
    return _Blob(lz4.frame.compress(_dense_bytes(t)), t.shape, t.dtype)


def _lz4_decode(e: _Blob) -> torch.Tensor:
    # lazy: optional (the bench extra)
    import lz4.frame
    return _from_bytes(lz4.frame.decompress(e.data), e.shape, e.dtype)


def zipnn_version() -> str | None:
    try:
        from importlib.metadata import version
        return version("zipnn")
    except Exception:  # noqa: BLE001 - not installed
        return None


def _zipnn_encode(t: torch.Tensor) -> _Blob:
    # lazy: optional (the bench extra)
    import zipnn
    z = zipnn.ZipNN(input_format="torch", threads=torch.get_num_threads())
    # ZipNN 0.5.4 moves the sign bit of every bfloat16 and float32 value of its input in place
    # (its byte grouping): it compresses a copy, or the caller's tensor is changed.
    return _Blob(bytes(z.compress(t.detach().clone().contiguous())), t.shape, t.dtype)


def _zipnn_decode(e: _Blob) -> torch.Tensor:
    import zipnn
    z = zipnn.ZipNN(input_format="torch", threads=torch.get_num_threads())
    return z.decompress(e.data).reshape(e.shape)


def _has(module: str) -> Callable[[], bool]:
    def available() -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a missing parent package
            return False
    return available


PEERS: dict[str, Peer] = {p.name: p for p in (
    Peer("csr", "torch.sparse CSR, int32 indices", _csr_encode, _sparse_decode, _csr_nbytes,
         lambda: True),
    Peer("coo", "torch.sparse COO, int64 indices", _coo_encode, _sparse_decode, _coo_nbytes,
         lambda: True),
    Peer("ct-bitmask", "compressed-tensors sparse-bitmask", _ct_encode, _ct_decode, _ct_nbytes,
         _has("compressed_tensors")),
    Peer("zstd", "zstandard level 3 of the dense bytes", _zstd_encode, _zstd_decode,
         lambda e: len(e.data), _has("zstandard")),
    Peer("lz4", "lz4 frame of the dense bytes", _lz4_encode, _lz4_decode,
         lambda e: len(e.data), _has("lz4")),
    Peer("zipnn", "ZipNN (byte grouping + Huffman), CPU, torch.get_num_threads() threads",
         _zipnn_encode, _zipnn_decode, lambda e: len(e.data), _has("zipnn")),
)}


def available_peers() -> dict[str, Peer]:
    return {name: p for name, p in PEERS.items() if p.available()}
