"""endor bench formats and the peer formats it compares with (src/endor/bench/peers.py): every
peer round-trips bit-exactly (else the comparison means nothing), stored sizes match what each
format must store, and the benchmark's numbers sit where arithmetic puts them."""

import math

import pytest
import torch

from endor.bench import formats, harness, peers
from endor.cli import build_parser
from endor.cli.bench import benchmark_params
from endor.format.equal import bit_equal
from tests.helpers import DTYPES

SHAPES = [(), (1, 1), (7, 13), (830, 545), (3, 5, 7), (17,), (0,), (0, 5), (5, 0)]
SPARSITIES = [0.0, 0.6, 1.0]
BITS = {torch.float32: 32, torch.float16: 16, torch.bfloat16: 16}


@pytest.mark.parametrize("name", sorted(peers.PEERS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_peer_round_trips_bit_exactly(name, dtype):
    peer = peers.PEERS[name]
    if not peer.available():
        pytest.skip(f"{name}'s library is not installed")
    assert peer.must_be_exact  # a library known to be lossy would be flagged, not skipped here
    for shape in SHAPES:
        for sparsity in SPARSITIES:
            dense = harness.random_sparse(shape, dtype, sparsity, seed=3)
            encoded = peer.encode(dense)
            assert bit_equal(peer.decode(encoded), dense), (name, shape, dtype, sparsity)


@pytest.mark.parametrize("name", sorted(peers.PEERS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_peers_leave_their_input_untouched(name, dtype):
    """ZipNN 0.5.4 rewrites the sign bits of a bfloat16 or float32 input in place: compared with
    its own changed input, its exact round trip once looked lossy."""
    peer = peers.PEERS[name]
    if not peer.available():
        pytest.skip(f"{name}'s library is not installed")
    dense = harness.random_sparse((830, 545), dtype, 0.5, seed=3)
    kept = dense.clone()
    decoded = peer.decode(peer.encode(dense))
    assert bit_equal(dense, kept) and bit_equal(decoded, kept)


SPECIAL = [-0.0, float("nan"), float("inf"), -float("inf"), 1e-40, 0.0, 2.5]


@pytest.mark.parametrize("name", ["csr", "coo", "zstd", "lz4", "zipnn"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_peers_keep_negative_zero_nan_and_subnormals(name, dtype):
    dense = torch.tensor(SPECIAL, dtype=torch.float32).to(dtype)
    peer = peers.PEERS[name]
    if not peer.available():
        pytest.skip(f"{name}'s library is not installed")
    assert bit_equal(peer.decode(peer.encode(dense)), dense)


def test_ct_bitmask_turns_negative_zero_into_positive_zero():
    # The library's own test is `tensor != 0`: documented in peers.py, and the reason the
    # benchmark feeds it tensors whose zeros are all +0.0.
    if not peers.PEERS["ct-bitmask"].available():
        pytest.skip("compressed-tensors is not installed")
    dense = torch.tensor([-0.0, 1.0, 0.0, 2.0], dtype=torch.float16)
    out = peers.PEERS["ct-bitmask"].decode(peers.PEERS["ct-bitmask"].encode(dense))
    assert out.view(torch.int16).tolist() == [0, dense[1:2].view(torch.int16).item(), 0,
                                              dense[3:4].view(torch.int16).item()]


@pytest.mark.parametrize("dtype", DTYPES)
def test_stored_sizes_are_what_each_format_must_store(dtype):
    rows, cols, s = 64, 96, 0.75
    dense = harness.random_sparse((rows, cols), dtype, s, seed=1)
    nnz, b = round((1 - s) * rows * cols), BITS[dtype] // 8
    sizes = {name: p.nbytes(p.encode(dense)) for name, p in peers.available_peers().items()}
    assert sizes["csr"] == nnz * (b + 4) + (rows + 1) * 4
    assert sizes["coo"] == nnz * (b + 2 * 8)
    if "ct-bitmask" in sizes:  # values + a bitmap padded per row + row offsets + the shape
        assert sizes["ct-bitmask"] == nnz * b + rows * math.ceil(cols / 8) + rows * 8 + 2 * 8


def test_random_sparse_has_exact_zero_count_and_only_positive_zeros():
    for dtype in DTYPES:
        for s in (0.0, 0.3, 0.5, 1.0):
            t = harness.random_sparse((37, 41), dtype, s, seed=2)
            ints = t.view(torch.int16 if dtype != torch.float32 else torch.int32)
            assert int((ints == 0).sum()) == round(s * t.numel())
            assert int((t == 0).sum()) == int((ints == 0).sum())  # no -0.0 anywhere
    with pytest.raises(ValueError, match="sparsity"):
        harness.random_sparse((4,), torch.float16, 1.5)


def test_bits_bound_matches_the_brief():
    assert formats.bits_bound(torch.float16, 0.5) == 9.0
    assert formats.bits_bound(torch.bfloat16, 0.7) == pytest.approx(5.8)
    assert formats.bits_bound(torch.float32, 0.5) == 17.0


def test_a_lossy_codec_is_refused_not_timed():
    lossy = formats.Codec("truncating", "drops the last element", lambda t: t.clone(),
                          lambda t: torch.cat([t[:-1], torch.zeros(1, dtype=t.dtype)]),
                          lambda t: 0)
    with pytest.raises(RuntimeError, match="bit-exact"):
        formats.measure_codec(lossy, torch.ones(8, dtype=torch.float16), warmup=0, repeat=1)


def _args(*extra):
    return benchmark_params(build_parser().parse_args(["bench", "formats", "--quick", "--repeat",
                                                       "1", *extra]))


@pytest.fixture(scope="module")
def doc():
    return formats.run(**_args("--shape", "256,512", "--sparsities", "0.5,0.7", "--warmup", "0"))


def test_run_reports_every_format_dtype_and_sparsity(doc):
    names = {r["format"] for r in doc["results"]}
    assert {"dense", "endor", "endor-exp", "endor-reference", "csr", "coo"} <= names
    assert set(peers.available_peers()) <= names
    cases = {(r["dtype"], r["sparsity"]) for r in doc["results"]}
    assert cases == {(d, s) for d in ("float32", "float16", "bfloat16") for s in (0.5, 0.7)}
    assert all(r["lossless"] for r in doc["results"])
    assert all(r["n"] == 1 and r["decode_gbps"] > 0 for r in doc["results"])


def test_endor_bits_sit_just_above_the_bound(doc):
    for r in doc["results"]:
        if r["format"] in ("endor", "endor-reference"):
            assert r["bits_bound"] <= r["bits_per_element"] <= r["bits_bound"] + 0.1, r
        if r["format"] == "endor-exp":  # fewer bits than raw's bound, never more than raw
            raw = next(c for c in doc["results"] if c["format"] == "endor"
                       and (c["dtype"], c["sparsity"]) == (r["dtype"], r["sparsity"]))
            assert r["bits_per_element"] < raw["bits_per_element"], r
        if r["format"] == "dense":
            assert r["bits_per_element"] == {"float32": 32, "float16": 16, "bfloat16": 16}[
                r["dtype"]]
            assert r["decode_vs_copy"] == 1.0
        dense_bits = BITS[getattr(torch, r["dtype"])]
        assert r["compression_ratio"] == pytest.approx(dense_bits / r["bits_per_element"])


def test_formats_option_keeps_the_copy_baseline():
    d = formats.run(**_args("--shape", "32,32", "--dtypes", "fp16", "--sparsities", "0.5",
                          "--formats", "endor,zstd", "--warmup", "0"))
    assert [r["format"] for r in d["results"]] == ["dense", "endor", "zstd"]
    with pytest.raises(ValueError, match="unknown format"):
        formats.run(**_args("--shape", "8,8", "--formats", "gzip"))
    with pytest.raises(ValueError, match="no elements"):
        formats.run(**_args("--shape", "0,8"))


def test_threads_option_is_recorded_and_restored():
    before = torch.get_num_threads()
    d = formats.run(**_args("--shape", "16,16", "--dtypes", "bf16", "--sparsities", "0.5",
                          "--formats", "endor", "--warmup", "0", "--threads", "1"))
    assert d["params"]["threads"] == 1 and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="--threads"):
        formats.run(**_args("--shape", "8,8", "--threads", "0"))
