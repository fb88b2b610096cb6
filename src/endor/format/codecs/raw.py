"""The `raw` codec: the non-zero values with all their bits, in element order (format v1's
values part, unchanged)."""

from __future__ import annotations

import torch

from ...errors import FormatError
from .. import spec
from . import ValueCodec, register_codec

VALUES = "values"


class RawCodec(ValueCodec):
    name = "raw"
    dtypes = tuple(spec.DTYPES.values())

    def check_params(self, params, dtype):
        if params:
            raise FormatError(f"the raw codec takes no parameters, got {sorted(params)}")
        return {}

    def parts(self, shape, dtype, nnz, params):
        return {VALUES: (spec.SAFETENSORS_NAMES[dtype], [nnz])}

    def encode(self, values, tiles, **options):
        if options:
            raise ValueError(f"the raw codec takes no options, got {sorted(options)}")
        return {}, {VALUES: values}

    def decode_values(self, params, parts, tiles, dtype):
        values = parts[VALUES]
        if values.dtype != dtype or values.dim() != 1 or values.numel() != int(tiles[-1]):
            raise FormatError(f"values is {values.dtype}{list(values.shape)}, expected "
                              f"{dtype}[{int(tiles[-1])}]")
        return values


register_codec(RawCodec())
