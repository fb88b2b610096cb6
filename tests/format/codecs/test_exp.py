"""The exp codec: bit-exact through every decoder, the numpy encoder equal to the torch
reference, the size targets, and one malformed file per exp MUST rule (docs/FORMAT.md 1.1)."""

import dataclasses

import pytest
import torch

import endor
from endor.format.codecs import exp as X
from endor.format.encode import tile_offsets
from endor.format.decompress import backends
from endor.kernels.cpu import decompress as cpu_decode
from endor.kernels.cpu import supported_isas
from endor.format.equal import bit_equal
from tests.helpers import DTYPES, INT_VIEW, sparse_tensor

SHAPES = [(1, 1), (7, 13), (830, 545), (3, 4097)]
SPARSITIES = [0.0, 0.5, 0.9, 1.0]


def with_extremes(t: torch.Tensor) -> torch.Tensor:
    """NaN with a payload, +-inf, -0.0, a subnormal, the largest and smallest normal: the
    exponent's both ends, so escapes (and code 0 / 6) are exercised."""
    t = t.clone()
    flat = t.view(-1)
    info = torch.finfo(t.dtype)
    specials = [float("nan"), float("inf"), -float("inf"), -0.0, info.tiny / 4, info.max,
                info.tiny, -info.max]
    n = min(len(specials), flat.numel())
    flat[:n] = torch.tensor(specials[:n]).to(t.dtype)
    if n:
        ints = flat.view(INT_VIEW[t.dtype])
        ints[0] = ints[0] | 1  # NaN payload
    return t


def triton_ready() -> bool:
    return backends()["triton"].available()


def decoders():
    found = [("reference", lambda et, out: endor.decompress(et, out=out, backend="reference"))]
    for isa in supported_isas():
        found.append((f"cpu-{isa}", lambda et, out, isa=isa: cpu_decode(et, out.view(-1), isa=isa)))
    if triton_ready():  # under TRITON_INTERPRET=1 (make test) or on a GPU
        found.append(("triton", lambda et, out: out.copy_(
            endor.decompress(et.to(GPU), backend="triton").cpu())))
    return found


GPU = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_exp_on_the_gpu(dtype):
    t = with_extremes(sparse_tensor((830, 545), dtype, 0.5))
    et = endor.compress(t, values="exp").to("cuda")
    from endor.kernels import triton_exp
    out = torch.empty(et.numel, dtype=dtype, device="cuda")
    assert bool(triton_exp.decode_and_validate(et, out))
    assert bit_equal(out.view(t.shape).cpu(), t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_roundtrip_bit_exact_every_decoder(dtype, shape, sparsity):
    t = with_extremes(sparse_tensor(shape, dtype, sparsity)) if sparsity < 1 else \
        torch.zeros(shape, dtype=dtype)
    et = endor.compress(t, values="exp")
    assert et.values_codec == "exp" and et.values is None and et.verify_checksum()
    for name, run in decoders():
        out = torch.full_like(t, 7)
        run(et, out)
        assert bit_equal(out, t), name


def test_escapes_are_exercised():
    t = with_extremes(sparse_tensor((64, 64), torch.bfloat16, 0.5))
    et = endor.compress(t, values="exp")
    assert et.codec_params["escapes"] >= 4
    assert bit_equal(endor.decompress(et), t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.97])
def test_numpy_encoder_matches_the_reference(dtype, sparsity):
    t = with_extremes(sparse_tensor((830, 545), dtype, sparsity)).view(-1)
    mask = t.view(INT_VIEW[dtype]) != 0
    values, tiles = t[mask], tile_offsets(mask)
    params, parts = X.encode(values, tiles)
    params_np, parts_np = X.encode_numpy(values, tiles)
    assert params == params_np and sorted(parts) == sorted(parts_np)
    assert all(torch.equal(parts[k], parts_np[k]) for k in parts)


def magnitude_pruned(dtype, shape=(1024, 1024), sparsity=0.5):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
    k = w.abs().flatten().kthvalue(int(w.numel() * sparsity)).values
    w[w.abs() <= k] = 0
    return w.to(dtype)


@pytest.mark.parametrize("dtype, target", [(torch.bfloat16, 6.6), (torch.float16, 8.3)])
def test_size_targets_at_half_sparsity(dtype, target):
    w = magnitude_pruned(dtype)
    bits = 8 * endor.compress(w, values="exp").nbytes / w.numel()
    raw = 8 * endor.compress(w, values="raw").nbytes / w.numel()
    assert bits <= target and raw > 9.0, (bits, raw)


# ---- malformed exp data: each rule, every CPU decoder, always a FormatError ----------------

def broken(edit, dtype=torch.float16, shape=(70, 130)):
    """An exp tensor with edit(parts, params) applied and its checksum recomputed (so the
    codec's own rule is what fails)."""
    et = endor.compress(with_extremes(sparse_tensor(shape, dtype, 0.5)), values="exp")
    parts = {k: v.clone() for k, v in et.codec_parts.items()}
    params = dict(et.codec_params)
    edit(parts, params)
    et = dataclasses.replace(et, codec_parts=parts, codec_params=params)
    return dataclasses.replace(et, checksum=et.compute_checksum())


def assert_rejected(et, tmp_path, words):
    for name, run in decoders():
        if name == "triton":  # the GPU decoder flags, never raises or reads out of bounds
            from endor.kernels import triton_exp
            ok = triton_exp.decode_and_validate(et.to(GPU), torch.empty(et.numel, dtype=et.dtype,
                                                                         device=GPU))
            assert not bool(ok)
            continue
        with pytest.raises(endor.FormatError, match=words):
            run(et, torch.empty(et.shape, dtype=et.dtype))
    path = tmp_path / "x.safetensors"
    endor.save_file({"w": et}, path)
    with pytest.raises(endor.FormatError, match="'w'"):
        endor.load_file(path)


def test_base_too_large(tmp_path):
    def edit(parts, params):
        parts[X.BASES][0] = X.max_base(torch.float16) + 1
    assert_rejected(broken(edit), tmp_path, "base")


@pytest.mark.parametrize("where", ["first", "last", "decreasing", "more_than_values"])
def test_bad_escape_index(tmp_path, where):
    def edit(parts, params):
        idx = parts[X.ESCIDX]
        if where == "first":
            idx[0] = 1
        elif where == "last":
            idx[-1] -= 1
        elif where == "decreasing":
            idx[1] = idx[2] + 1
        else:  # tile 0 claims more escapes than it has values (4096 elements, ~half zero)
            params["escapes"] = 4097
            idx[1:] = 4097
            parts[X.ESCAPES] = torch.zeros(4097, dtype=torch.uint8)
    assert_rejected(broken(edit), tmp_path, "escape")


def test_escape_codes_disagree_with_the_index(tmp_path):
    def edit(parts, params):
        # Turn value 40's code into an escape (all three code planes set): one escape too many.
        for p in range(3):
            parts[X.CODES][p * 8 + 5] |= 1  # group 0, plane p, byte 5 = values 40..47
    assert_rejected(broken(edit), tmp_path, "escape")


def test_escaped_exponent_too_large(tmp_path):
    def edit(parts, params):
        assert params["escapes"] > 0
        parts[X.ESCAPES][0] = 32  # float16 exponents are 5 bits
    assert_rejected(broken(edit), tmp_path, "exponent")


@pytest.mark.parametrize("params, words", [({}, "escapes"), ({"escapes": -1}, "escapes"),
                                           ({"escapes": 1, "x": 2}, "escapes"),
                                           ({"escapes": True}, "escapes")])
def test_bad_params(params, words):
    with pytest.raises(endor.FormatError, match=words):
        X.ExpCodec().check_params(params, torch.bfloat16)


def test_more_escapes_than_values_is_rejected_before_allocation():
    with pytest.raises(endor.FormatError, match="escapes"):
        X.ExpCodec().parts(torch.Size([10]), torch.bfloat16, 3, {"escapes": 4})


def test_file_with_wrong_part_size(tmp_path):
    et = broken(lambda parts, params: parts.update(
        {X.SIGNMANT: parts[X.SIGNMANT][:-1]}))
    path = tmp_path / "x.safetensors"
    endor.save_file({"w": et}, path)
    with pytest.raises(endor.FormatError, match="w.endor.signmant"):
        endor.open_file(path)
