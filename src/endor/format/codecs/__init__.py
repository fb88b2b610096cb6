"""Value codecs (docs/FORMAT.md, section 1.2): how an Endor tensor stores its `nnz` non-zero
values. The bitmap and the tile index are the format's; everything about the values is the
codec's: its parameters (in the metadata entry, beside `"codec"`), its parts (stored tensors
`NAME.endor.<suffix>`), how to encode them and a plain-torch reference decoder.

A codec plugs in by subclassing ValueCodec and calling `register_codec`. Fast decoders
(kernels/) say which codecs they handle; for any other codec the reference decoder runs
`decode_values` and expands the bitmap."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ...errors import FormatError


class ValueCodec:
    """The interface. Every method is pure: no state, no I/O."""

    name: str = ""
    dtypes: tuple[torch.dtype, ...] = ()  # the tensor dtypes it codes

    def check_params(self, params: Mapping, dtype: torch.dtype) -> dict:
        """Rule 3 for the codec's parameters (the `values` entry less `"codec"`): return them
        normalised, or raise FormatError saying what is wrong."""
        raise NotImplementedError

    def parts(self, shape: torch.Size, dtype: torch.dtype, nnz: int,
              params: Mapping) -> dict[str, tuple[str, list[int]]]:
        """Rule 4: {suffix: (safetensors dtype, shape)} of the codec's parts, in checksum order,
        from checked metadata alone (so sizes are bounded before anything is allocated)."""
        raise NotImplementedError

    def encode(self, values: torch.Tensor, tiles: torch.Tensor,
               **options) -> tuple[dict, dict[str, torch.Tensor]]:
        """values [nnz] (the tensor's dtype, in element order) and the tile index ->
        (params, {suffix: part})."""
        raise NotImplementedError

    def decode_values(self, params: Mapping, parts: Mapping[str, torch.Tensor],
                      tiles: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The reference: the non-zero values [nnz] of `dtype`, bit-exact, plain torch. Bad
        codec data raises FormatError, never reads out of bounds."""
        raise NotImplementedError


_CODECS: dict[str, ValueCodec] = {}


def register_codec(codec: ValueCodec) -> ValueCodec:
    if not codec.name or codec.name in _CODECS:
        raise ValueError(f"codec name {codec.name!r} is empty or already registered")
    _CODECS[codec.name] = codec
    return codec


def codec_names() -> list[str]:
    return sorted(_CODECS)


def get_codec(name) -> ValueCodec:
    """The codec called `name`; FormatError if this endor does not know it."""
    codec = _CODECS.get(name) if isinstance(name, str) else None
    if codec is None:
        raise FormatError(f"value codec {name!r} is not one of {codec_names()}: the file needs a "
                          "newer endor, or is corrupt")
    return codec


def check_values_entry(entry, dtype: torch.dtype) -> tuple[str, dict]:
    """Rule 3 for the `values` object of a version-2 entry -> (codec name, checked params)."""
    if not isinstance(entry, dict) or "codec" not in entry:
        raise FormatError(f"'values' is {entry!r}, expected an object with a 'codec' name")
    codec = get_codec(entry["codec"])
    if dtype not in codec.dtypes:
        raise FormatError(f"value codec {codec.name!r} does not code {dtype}")
    params = {k: v for k, v in entry.items() if k != "codec"}
    return codec.name, codec.check_params(params, dtype)


from . import exp as _exp  # noqa: E402,F401  registers "exp"
from . import raw as _raw  # noqa: E402,F401  registers "raw"

__all__ = ["ValueCodec", "check_values_entry", "codec_names", "get_codec", "register_codec"]
