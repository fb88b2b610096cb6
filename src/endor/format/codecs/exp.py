"""The `exp` codec (docs/FORMAT.md, section 1.1): each non-zero value's exponent coded in 3 bits
from a per-tile base, its sign and mantissa kept raw.

After pruning, the exponents of a tile's surviving values crowd into a few neighbouring values
(2.5-2.7 bits of entropy in dense bf16 LLM weights, fewer after magnitude pruning), so code
`c` in 0..6 stands for exponent `base[tile] + c` and code 7 for an escape whose exponent is
stored whole in a per-tile run of the `escapes` part. Sign and mantissa stay raw: one byte for
bfloat16, 11 bits for float16 (a byte plus 3 bits), 3 bytes for float32. Codes are stored as
bit planes of 64 values, so a SIMD decoder turns one 64-bit word per plane into 64 codes and a
16-entry table lookup gives the exponents. Every tile decodes alone: its values start at
`tiles[k]`, its escapes at `escidx[k]`."""

from __future__ import annotations

import numpy as np
import torch

from ...errors import FormatError
from .. import spec
from . import ValueCodec, register_codec

CODE_BITS = 3
ESCAPE = (1 << CODE_BITS) - 1  # code 7
WINDOW = ESCAPE  # exponents base .. base + 6 are coded directly
GROUP = 64  # values per bit-plane word
_CHUNK_TILES = 32  # the numpy encoder's unit of work: at most 128K values
_CHUNK_GROUPS = 2048

# dtype -> (exponent bits, mantissa bits, whole bytes of sign+mantissa, extra plane bits)
LAYOUT = {torch.bfloat16: (8, 7, 1, 0), torch.float16: (5, 10, 1, 3), torch.float32: (8, 23, 3, 0)}
SIGNMANT, CODES, BASES, ESCAPES, ESCIDX = "signmant", "codes", "bases", "escapes", "escidx"


def planes(dtype: torch.dtype) -> int:
    return CODE_BITS + LAYOUT[dtype][3]


def max_base(dtype: torch.dtype) -> int:
    return (1 << LAYOUT[dtype][0]) - WINDOW


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class ExpCodec(ValueCodec):
    name = "exp"
    dtypes = tuple(LAYOUT)

    def check_params(self, params, dtype):
        if set(params) != {"escapes"} or not _is_int(params["escapes"]) or params["escapes"] < 0:
            raise FormatError(f"the exp codec takes exactly {{\"escapes\": <int >= 0>}}, got "
                              f"{dict(params)}")
        return {"escapes": params["escapes"]}

    def parts(self, shape, dtype, nnz, params):
        if params["escapes"] > nnz:
            raise FormatError(f"exp codec: {params['escapes']} escapes for {nnz} values")
        numel = 1
        for d in shape:
            numel *= d
        tiles = spec.num_tiles(numel)
        groups = -(-nnz // GROUP)
        return {SIGNMANT: ("U8", [nnz * LAYOUT[dtype][2]]),
                CODES: ("U8", [groups * planes(dtype) * 8]),
                BASES: ("U8", [tiles]),
                ESCIDX: ("I64", [tiles + 1]),
                ESCAPES: ("U8", [params["escapes"]])}

    def encode(self, values, tiles, **options):
        if options:
            raise ValueError(f"the exp codec takes no options, got {sorted(options)}")
        if values.device.type == "cpu" and tiles.device.type == "cpu":
            return encode_numpy(values, tiles)
        return encode(values, tiles)

    def decode_values(self, params, parts, tiles, dtype):
        return decode_values(params, parts, tiles, dtype)


def _split(values: torch.Tensor):
    """values [nnz] -> (exponent int64 [nnz], sign+mantissa r int64 [nnz])."""
    e_bits, m_bits, _, _ = LAYOUT[values.dtype]
    width = 1 + e_bits + m_bits
    ints = values.view(spec.INT_VIEW[values.dtype]).to(torch.int64) & ((1 << width) - 1)
    exponent = (ints >> m_bits) & ((1 << e_bits) - 1)
    r = ((ints >> (width - 1)) << m_bits) | (ints & ((1 << m_bits) - 1))
    return exponent, r


def tile_of_values(tiles: torch.Tensor) -> torch.Tensor:
    """int64 [nnz]: the tile each value belongs to."""
    counts = tiles[1:] - tiles[:-1]
    return torch.repeat_interleave(torch.arange(counts.numel(), device=tiles.device), counts)


def choose_bases(exponent: torch.Tensor, tile: torch.Tensor, ntiles: int,
                 dtype: torch.dtype) -> torch.Tensor:
    """Per tile, the base whose window of 7 exponents holds the most of the tile's values
    (the lowest such base on ties; 0 for an empty tile)."""
    levels = 1 << LAYOUT[dtype][0]
    hist = torch.zeros(ntiles * levels, dtype=torch.int32, device=exponent.device)
    hist.index_add_(0, tile * levels + exponent, torch.ones_like(exponent, dtype=torch.int32))
    hist = hist.view(ntiles, levels)
    csum = torch.nn.functional.pad(hist.cumsum(1), (1, 0))
    cover = csum[:, WINDOW:WINDOW + max_base(dtype) + 1] - csum[:, :max_base(dtype) + 1]
    return cover.argmax(1).to(torch.uint8)


def _pack_planes(q: torch.Tensor, n_planes: int) -> torch.Tensor:
    """q int64 [nnz] (n_planes bits each) -> uint8 [groups, n_planes, 8]: plane p of group g
    holds bit p of values 64g .. 64g+63, value 64g+j at bit j (little-endian 64-bit word)."""
    groups = -(-q.numel() // GROUP)
    padded = torch.zeros(groups * GROUP, dtype=torch.int64, device=q.device)
    padded[:q.numel()] = q
    weights = (1 << torch.arange(8, device=q.device, dtype=torch.int64))
    out = torch.empty(groups, n_planes, 8, dtype=torch.uint8, device=q.device)
    bits = padded.view(groups, 8, 8)
    for p in range(n_planes):
        out[:, p, :] = (((bits >> p) & 1) * weights).sum(-1).to(torch.uint8)
    return out.view(-1)


def _unpack_planes(codes: torch.Tensor, nnz: int, n_planes: int) -> torch.Tensor:
    """Inverse of _pack_planes: int64 [nnz]."""
    groups = -(-nnz // GROUP)
    raw = codes.view(groups, n_planes, 8).to(torch.int64)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64)
    bits = (raw.unsqueeze(-1) >> shifts) & 1  # [groups, planes, 8 bytes, 8 bits]
    bits = bits.reshape(groups, n_planes, GROUP)
    weights = (1 << torch.arange(n_planes, device=codes.device, dtype=torch.int64))
    q = (bits * weights.view(1, -1, 1)).sum(1)
    return q.reshape(-1)[:nnz]


def encode(values: torch.Tensor, tiles: torch.Tensor):
    dtype = values.dtype
    if dtype not in LAYOUT:
        raise ValueError(f"the exp codec codes {', '.join(map(str, LAYOUT))}, not {dtype}")
    _, m_bits, n_bytes, extra_bits = LAYOUT[dtype]
    ntiles = tiles.numel() - 1
    exponent, r = _split(values)
    tile = tile_of_values(tiles)
    bases = choose_bases(exponent, tile, ntiles, dtype)
    code = exponent - bases.to(torch.int64)[tile]
    escaped = (code < 0) | (code >= WINDOW)
    code[escaped] = ESCAPE
    escapes = exponent[escaped].to(torch.uint8)
    per_tile = torch.zeros(ntiles, dtype=torch.int64, device=values.device)
    per_tile.index_add_(0, tile[escaped], torch.ones_like(escapes, dtype=torch.int64))
    escidx = torch.cat([torch.zeros(1, dtype=torch.int64, device=values.device),
                        per_tile.cumsum(0)])
    shifts = torch.arange(n_bytes, device=values.device, dtype=torch.int64) * 8
    signmant = ((r.unsqueeze(1) >> shifts) & 0xFF).to(torch.uint8).reshape(-1)
    q = code | ((r >> (8 * n_bytes)) << CODE_BITS) if extra_bits else code
    parts = {SIGNMANT: signmant, CODES: _pack_planes(q, planes(dtype)), BASES: bases,
             ESCIDX: escidx, ESCAPES: escapes}
    return {"escapes": escapes.numel()}, parts


def encode_numpy(values: torch.Tensor, tiles: torch.Tensor):
    """`encode` for CPU tensors, the same output: numpy, a chunk of tiles at a time so the
    temporaries stay in cache (the torch `encode` above is the specification)."""
    dtype = values.dtype
    if dtype not in LAYOUT:
        raise ValueError(f"the exp codec codes {', '.join(map(str, LAYOUT))}, not {dtype}")
    e_bits, m_bits, n_bytes, extra_bits = LAYOUT[dtype]
    width = 8 * dtype.itemsize
    unsigned = {16: np.uint16, 32: np.uint32}[width]
    ints = values.contiguous().view(spec.INT_VIEW[dtype]).numpy().view(unsigned)
    starts = tiles.numpy()
    ntiles, nnz = starts.size - 1, ints.size
    levels, top = 1 << e_bits, max_base(dtype)
    bases = np.zeros(ntiles, dtype=np.uint8)
    escidx = np.zeros(ntiles + 1, dtype=np.int64)
    signmant = np.empty((nnz, n_bytes), dtype=np.uint8)
    groups = -(-nnz // GROUP)
    q = np.zeros(groups * GROUP, dtype=np.uint8)
    escapes = []
    n_escapes = 0
    for t0 in range(0, ntiles, _CHUNK_TILES):
        t1 = min(t0 + _CHUNK_TILES, ntiles)
        lo, hi = int(starts[t0]), int(starts[t1])
        chunk = ints[lo:hi]
        counts = np.diff(starts[t0:t1 + 1])
        tile = np.repeat(np.arange(t1 - t0, dtype=np.int32), counts)
        exponent = ((chunk >> m_bits) & (levels - 1)).astype(np.int32)
        hist = np.bincount(tile * levels + exponent, minlength=(t1 - t0) * levels)
        csum = np.pad(hist.reshape(t1 - t0, levels).cumsum(1), ((0, 0), (1, 0)))
        chunk_bases = (csum[:, WINDOW:WINDOW + top + 1] - csum[:, :top + 1]).argmax(1)
        bases[t0:t1] = chunk_bases
        code = exponent - chunk_bases.astype(np.int32)[tile]
        escaped = (code < 0) | (code >= WINDOW)
        code[escaped] = ESCAPE
        escapes.append(exponent[escaped].astype(np.uint8))
        per_tile = np.bincount(tile[escaped], minlength=t1 - t0)
        escidx[t0 + 1:t1 + 1] = n_escapes + np.cumsum(per_tile)
        n_escapes += int(per_tile.sum())
        r = ((chunk >> (width - 1)).astype(np.uint32) << m_bits) | (chunk & ((1 << m_bits) - 1))
        for b in range(n_bytes):
            signmant[lo:hi, b] = r >> (8 * b)
        if extra_bits:
            code |= (r >> (8 * n_bytes)).astype(np.int32) << CODE_BITS
        q[lo:hi] = code
    codes = np.empty((groups, planes(dtype), 8), dtype=np.uint8)
    q = q.reshape(groups, GROUP)
    for g0 in range(0, groups, _CHUNK_GROUPS):
        block = q[g0:g0 + _CHUNK_GROUPS]
        for p in range(planes(dtype)):
            codes[g0:g0 + _CHUNK_GROUPS, p, :] = np.packbits((block >> p) & 1, axis=1,
                                                             bitorder="little")
    escapes = np.concatenate(escapes) if escapes else np.zeros(0, dtype=np.uint8)
    parts = {SIGNMANT: signmant.reshape(-1), CODES: codes.reshape(-1), BASES: bases,
             ESCIDX: escidx, ESCAPES: escapes}
    return {"escapes": n_escapes}, {k: torch.from_numpy(v) for k, v in parts.items()}


def _check_index(index: torch.Tensor, total: int, limits: torch.Tensor, what: str) -> None:
    if int(index[0]) != 0 or int(index[-1]) != total:
        raise FormatError(f"exp codec: {what} must start at 0 and end at {total}")
    counts = index[1:] - index[:-1]
    bad = (counts < 0) | (counts > limits)
    if bool(bad.any()):
        k = int(bad.nonzero()[0])
        raise FormatError(f"exp codec: tile {k} claims {int(counts[k])} {what} entries, outside "
                          f"[0, {int(limits[k])}]")


def decode_values(params, parts, tiles, dtype) -> torch.Tensor:
    """The reference decoder: checks every exp MUST rule on the way, plain torch."""
    e_bits, m_bits, n_bytes, _ = LAYOUT[dtype]
    nnz = int(tiles[-1])
    counts = tiles[1:] - tiles[:-1]
    bases = parts[BASES].to(torch.int64)
    if bool((bases > max_base(dtype)).any()):
        k = int((bases > max_base(dtype)).nonzero()[0])
        raise FormatError(f"exp codec: tile {k} has base {int(bases[k])}, more than "
                          f"{max_base(dtype)} for {dtype}")
    escapes = parts[ESCAPES].to(torch.int64)
    _check_index(parts[ESCIDX], escapes.numel(), counts, "escape")
    if bool((escapes >> e_bits).any()):
        raise FormatError(f"exp codec: an escaped exponent is {int(escapes.max())}, more than "
                          f"{dtype} has ({(1 << e_bits) - 1})")
    q = _unpack_planes(parts[CODES], nnz, planes(dtype))
    code = q & ESCAPE
    tile = tile_of_values(tiles)
    escaped = code == ESCAPE
    found = torch.zeros(counts.numel(), dtype=torch.int64, device=tiles.device)
    found.index_add_(0, tile[escaped], torch.ones_like(tile[escaped]))
    claimed = parts[ESCIDX][1:] - parts[ESCIDX][:-1]
    if not torch.equal(found, claimed):
        k = int((found != claimed).nonzero()[0])
        raise FormatError(f"exp codec: tile {k} has {int(found[k])} escape codes, the escape "
                          f"index says {int(claimed[k])}")
    exponent = bases[tile] + code
    exponent[escaped] = escapes
    shifts = torch.arange(n_bytes, device=tiles.device, dtype=torch.int64) * 8
    r = (parts[SIGNMANT].view(nnz, n_bytes).to(torch.int64) << shifts).sum(1)
    r = r | ((q >> CODE_BITS) << (8 * n_bytes))
    bits = ((r >> m_bits) << (e_bits + m_bits)) | (exponent << m_bits) | (r & ((1 << m_bits) - 1))
    int_dtype = spec.INT_VIEW[dtype]
    width = 8 * dtype.itemsize
    bits = torch.where(bits >= (1 << (width - 1)), bits - (1 << width), bits)
    return bits.to(int_dtype).view(dtype)


register_codec(ExpCodec())
