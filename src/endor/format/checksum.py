"""XXH3-64 over an Endor tensor's stored bytes (docs/FORMAT.md, rule 7)."""

import torch
import xxhash

PREFIX = "xxh3_64:"


def _bytes_view(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.reshape(-1)
    if flat.dtype.is_floating_point:
        flat = flat.view(torch.int16 if flat.element_size() == 2 else torch.int32)
    return memoryview(flat.numpy()).cast("B")


def checksum(bitmap: torch.Tensor, values: torch.Tensor, tiles: torch.Tensor) -> str:
    h = xxhash.xxh3_64()
    for part in (bitmap, values, tiles):
        h.update(_bytes_view(part))
    return PREFIX + h.hexdigest()
