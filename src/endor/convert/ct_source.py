"""compressed-tensors checkpoints (llm-compressor's outputs on the Hub) as conversion sources,
read back to the weights they hold, never pruned again:

* `sparse-bitmask` (legacy sparsity format): `W.compressed` (the non-zero values, row-major),
  `W.bitmask` (uint8, rows x ceil(cols / 8), least significant bit first), `W.row_offsets`
  (values before each row) and `W.shape`. Decoded here: bitmap + values, close to Endor's own.
* `pack-quantized` (int1-8 weights packed into int32): `W_packed`, `W_scale`, optional
  `W_zero_point`, `W_shape`; dequantized by compressed-tensors' own compressor with the
  config group's QuantizationArgs (one group; per-group targets are not matched).

Every other tensor reads as in an HF directory. Sizes come from headers and the small `shape`
tensors, checked against the parts before anything is decoded."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ..errors import FormatError
from .source import SourceCheckpoint, fingerprint

QUANT_METHOD = "compressed-tensors"
BITMASK_PARTS = ("compressed", "bitmask", "row_offsets", "shape")
PACKED_PARTS = ("packed", "scale", "zero_point", "shape", "g_idx")


def compressed_tensors_config(path) -> dict | None:
    """config.json's quantization_config when it is compressed-tensors', else None."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        return None
    return qc


class CompressedTensorsSource(SourceCheckpoint):
    def __init__(self, path, qc: dict):
        super().__init__(path)
        self._raw = super().names()
        self._raw_names = raw = set(self._raw)
        self._bitmask = {n.removesuffix(".compressed"): n.removesuffix(".compressed")
                         for n in raw if n.endswith(".compressed")}
        self._packed = {n.removesuffix("_packed"): n.removesuffix("_packed")
                        for n in raw if n.endswith("_packed")}
        sparsity = (qc.get("sparsity_config") or {}).get("format")
        if self._bitmask and sparsity not in (None, "sparse-bitmask"):
            raise FormatError(f"sparsity format {sparsity!r} is not supported (endor reads "
                              "'sparse-bitmask')", path=self.path)
        self._scheme = self._quantization_scheme(qc) if self._packed else None
        self._logical: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        parts = set()
        for name in self._bitmask:
            need = [f"{name}.{p}" for p in BITMASK_PARTS]
            self._require(name, need, raw)
            shape = self._shape(f"{name}.shape")
            rows, cols = (shape[0], math.prod(shape[1:])) if len(shape) > 1 else (1, shape[0])
            if super().shape(f"{name}.bitmask") != (rows, -(-cols // 8)):
                raise FormatError(f"bitmask is {list(super().shape(f'{name}.bitmask'))}, expected "
                                  f"{[rows, -(-cols // 8)]}", path=self.path, tensor=name)
            self._logical[name] = (shape, super().dtype(f"{name}.compressed"))
            parts.update(need)
        for name in self._packed:
            need = [f"{name}_{p}" for p in PACKED_PARTS if f"{name}_{p}" in raw]
            self._require(name, [f"{name}_packed", f"{name}_scale", f"{name}_shape"], raw)
            self._logical[name] = (self._shape(f"{name}_shape"),
                                   super().dtype(f"{name}_scale"))
            parts.update(need)
        self._names = sorted((raw - parts) | set(self._logical))
        self._name_set = set(self._names)

    # -- what the pipeline asks -----------------------------------------------------------
    def names(self) -> list[str]:
        return self._names

    def __contains__(self, name) -> bool:
        return name in self._name_set

    def dtype(self, name: str) -> torch.dtype:
        return self._logical[name][1] if name in self._logical else super().dtype(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._logical[name][0] if name in self._logical else super().shape(name)

    def nbytes(self, name: str) -> int:
        if name in self._logical:
            shape, dtype = self._logical[name]
            return math.prod(shape) * dtype.itemsize
        return super().nbytes(name)

    def read(self, name: str) -> torch.Tensor:
        if name in self._bitmask:
            return self._read_bitmask(name)
        if name in self._packed:
            return self._read_packed(name)
        return super().read(name)

    def fingerprint(self) -> str:
        return fingerprint(self.path, [(n, self._stored(n).dtype, self._stored(n).shape)
                                       for n in self._raw], self.files)

    # -- decoding -------------------------------------------------------------------------
    def _read_bitmask(self, name: str) -> torch.Tensor:
        shape, dtype = self._logical[name]
        values = super().read(f"{name}.compressed").reshape(-1)
        bitmask = super().read(f"{name}.bitmask")
        row_offsets = super().read(f"{name}.row_offsets").reshape(-1).to(torch.int64)
        rows, cols = bitmask.shape[0], math.prod(shape) // max(bitmask.shape[0], 1)
        mask = np.unpackbits(bitmask.numpy(), axis=-1, bitorder="little")[:, :cols]
        counts = mask.sum(axis=1, dtype=np.int64)
        if int(counts.sum()) != values.numel():
            raise FormatError(f"the bitmask marks {int(counts.sum())} values, "
                              f"{values.numel()} are stored", path=self.path, tensor=name)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]) if rows else counts
        if row_offsets.numel() != rows or not np.array_equal(row_offsets.numpy(), starts):
            raise FormatError("row_offsets do not match the bitmask", path=self.path,
                              tensor=name)
        dense = torch.zeros((rows, cols), dtype=dtype)
        dense[torch.from_numpy(mask.astype(bool))] = values
        return dense.reshape(shape)

    def _read_packed(self, name: str) -> torch.Tensor:
        from compressed_tensors.compressors.pack_quantized.base import \
            PackedQuantizationCompressor

        local = {f"weight_{p}": super(CompressedTensorsSource, self).read(f"{name}_{p}")
                 for p in PACKED_PARTS if f"{name}_{p}" in self._raw_names}
        local["weight_shape"] = torch.tensor(self._logical[name][0])
        try:
            out = PackedQuantizationCompressor.decompress(local, self._scheme)["weight"]
        except (RuntimeError, ValueError, AssertionError) as e:
            raise FormatError(f"cannot unpack this pack-quantized weight: {e}", path=self.path,
                              tensor=name) from None
        shape, dtype = self._logical[name]
        if tuple(out.shape) != tuple(shape):
            raise FormatError(f"unpacked to {list(out.shape)}, weight_shape says {list(shape)}",
                              path=self.path, tensor=name)
        return out.to(dtype)

    # -- helpers --------------------------------------------------------------------------
    def _require(self, name: str, parts: list[str], raw: set) -> None:
        missing = [p for p in parts if p not in raw]
        if missing:
            raise FormatError(f"compressed weight lacks {missing}", path=self.path, tensor=name)

    def _shape(self, name: str) -> tuple[int, ...]:
        if super().dtype(name).is_floating_point or len(super().shape(name)) != 1 \
                or not 1 <= super().shape(name)[0] <= 8:
            raise FormatError("a shape tensor must hold 1 to 8 integers", path=self.path,
                              tensor=name)
        shape = tuple(int(d) for d in super().read(name).tolist())
        if any(d < 0 for d in shape) or math.prod(shape) > 2**48:
            raise FormatError(f"shape {list(shape)} is not valid", path=self.path, tensor=name)
        return shape

    def _quantization_scheme(self, qc: dict):
        from compressed_tensors.quantization import QuantizationScheme

        fmt = qc.get("format")
        groups = qc.get("config_groups") or {}
        if fmt != "pack-quantized" or len(groups) != 1:
            raise FormatError(f"quantized weights in format {fmt!r} with {len(groups)} config "
                              "groups: endor reads 'pack-quantized' with one group",
                              path=self.path)
        group = next(iter(groups.values()))
        try:
            return QuantizationScheme(**{k: v for k, v in group.items() if k != "format"})
        except (TypeError, ValueError) as e:
            raise FormatError(f"cannot read the quantization scheme: {e}",
                              path=self.path) from None
