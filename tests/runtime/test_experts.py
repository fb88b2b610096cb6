"""Routed experts: only the chosen experts are read, token-identical to the in-memory model for
four MoE families, disk and RAM offload; the expert cache; malformed and corrupt files."""

import json
import shutil

import pytest
import torch

from endor import FormatError, compress
from endor.convert import convert
from endor.format import EndorFile, save_file
from endor.reference_loader import load_in_memory
from endor.moe import parse_expert_name
from endor.runtime import load_model
from endor.moe import ExpertNames
from endor.runtime.experts import decompress_expert, plan_experts
from endor.format.equal import bit_equal
from tests.helpers import DTYPES, sparse_tensor
from tests.moe_models import ARCHS, save_moe
from tests.runtime.checkpoints import greedy

PROMPT = torch.tensor([[5, 17, 3, 44, 9, 2, 71, 30]])
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    """moe(arch, weights) -> (converted checkpoint, in-memory greedy tokens, router choices per
    decode forward); converted once per module."""
    cache = {}

    def get(arch, weights="endor"):
        key = (arch, weights)
        if key not in cache:
            root = tmp_path_factory.mktemp(arch)
            save_moe(arch, root / "hf")
            out = root / weights
            convert(root / "hf", out, method="magnitude", sparsity=0.5, weights=weights,
                    progress=False)
            model, _ = load_in_memory(out)
            chosen = []
            for name, m in model.named_modules():
                if name.endswith(".gate") and hasattr(m, "top_k"):
                    m.register_forward_hook(
                        lambda mod, a, out, name=name: chosen.append((name, out[2].clone())))
            tokens = greedy(model, PROMPT, NEW_TOKENS)
            cache[key] = (out, tokens, chosen)
        return cache[key]

    return get


def test_the_reference_generates_varied_tokens(moe):
    for arch in ARCHS:
        _, tokens, _ = moe(arch)
        assert len(set(tokens)) >= 3, (arch, tokens)  # else token identity would prove little


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("offload", ["disk", "cpu"])
@pytest.mark.parametrize("mode", ["routed", "routed-cache", "whole-layers"])
def test_tokens_identical_to_the_in_memory_model(moe, arch, offload, mode):
    path, reference, _ = moe(arch)
    memory = "2MB" if mode == "routed-cache" else 0
    model = load_model(path, offload=offload, max_memory=memory,
                       expert_reads=mode != "whole-layers")
    try:
        assert greedy(model, PROMPT, NEW_TOKENS) == reference
        stats = model.endor_stats()
        if mode == "whole-layers":
            assert "expert_misses" not in stats and stats["streamed_layers"] == [0, 1, 2]
        elif offload == "disk":
            assert stats["expert_misses"] > 0
            assert stats["expert_hits"] > 0 if mode == "routed-cache" else \
                stats["expert_hits"] == 0
        else:
            assert stats["expert_held_bytes"] > 0 and stats["expert_misses"] == 0
    finally:
        model.endor_close()


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
def test_dense_weights_route_too(moe, arch):
    path, reference, _ = moe(arch, "dense")
    with_endor = moe(arch)[1]
    model = load_model(path, max_memory=0)
    try:
        assert greedy(model, PROMPT, NEW_TOKENS) == reference == with_endor
    finally:
        model.endor_close()


def test_without_a_budget_experts_are_resident_and_fused(moe):
    path, reference, _ = moe("qwen3_moe")
    model = load_model(path)
    assert greedy(model, PROMPT, NEW_TOKENS) == reference
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (8, 48, 32)
    assert "expert_misses" not in model.endor_stats()


@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral"])
def test_a_token_reads_its_layers_prefix_and_chosen_experts_only(moe, arch):
    path, reference, chosen = moe(arch)
    model = load_model(path, max_memory=0)
    try:
        greedy(model, PROMPT, NEW_TOKENS)
        stats = model.endor_stats()
    finally:
        model.endor_close()
    files = {i: EndorFile(p) for i, p in enumerate(sorted(path.glob("model-*.safetensors"))[:-1])}
    decode_calls = [c for c in chosen if c[1].shape[0] == 1]  # one token per decode forward
    expected = prefixes = all_experts = 0
    for name, idx in decode_calls:
        layer = int(name.split(".")[2])
        f = files[layer]
        experts = {}
        for n in f.keys():
            parsed = parse_expert_name(n)
            if parsed is not None:
                lo_hi = f.byte_ranges(n)
                start, end = min(s for s, _ in lo_hi), max(e for _, e in lo_hi)
                old = experts.get(parsed[1], (start, end))
                experts[parsed[1]] = (min(old[0], start), max(old[1], end))
        prefix = min(s for s, _ in experts.values())
        expected += prefix + sum(experts[e][1] - experts[e][0] for e in idx.unique().tolist())
        prefixes += prefix
        all_experts += sum(hi - lo for lo, hi in experts.values())
    decode_tokens = NEW_TOKENS - 1
    assert stats["decode_tokens"] == decode_tokens
    assert stats["bytes_read_per_token"] * decode_tokens == expected
    assert expected - prefixes < 0.75 * all_experts  # top-2 of 4 or 8 experts, not all


def test_a_cache_big_enough_hits_every_expert_after_the_first_run(moe):
    path, reference, _ = moe("olmoe")
    model = load_model(path, max_memory="64MB", expert_cache="lru")
    try:
        greedy(model, PROMPT, NEW_TOKENS)
        model.endor_reset_stats()
        misses = model.endor_stats()["expert_misses"]
        assert greedy(model, PROMPT, NEW_TOKENS) == reference
        stats = model.endor_stats()
        assert stats["expert_misses"] == misses and stats["expert_hits"] > 0
        assert stats["bytes_read_per_token"] == 0  # every core resident, every expert cached
    finally:
        model.endor_close()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (830, 545)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 1.0])
def test_decompress_expert_matches_the_reference_decompressor(tmp_path, dtype, shape, sparsity):
    inter, hidden = shape
    weights = {"x.experts.0.gate_proj.weight": sparse_tensor((inter, hidden), dtype, sparsity,
                                                             seed=1),
               "x.experts.0.up_proj.weight": sparse_tensor((inter, hidden), dtype, sparsity,
                                                           seed=2),
               "x.experts.0.down_proj.weight": sparse_tensor((hidden, inter), dtype, sparsity,
                                                             seed=3)}
    path = tmp_path / "e.safetensors"
    save_file({"a": torch.zeros(1, dtype=torch.uint8),  # an odd start: parts unaligned
               **{n: compress(w) for n, w in weights.items()}}, path, order=list(weights))
    names = ExpertNames("x.experts", "x", 1, (tuple(weights),))
    with EndorFile(path) as f:
        layer = plan_experts(0, f, "", names, dtype)
    expert = layer.experts[0]
    with open(path, "rb") as fh:
        fh.seek(expert.start)
        image = torch.frombuffer(bytearray(fh.read(expert.nbytes)), dtype=torch.uint8)
    outs = {}
    for backend in ("reference", "auto"):
        gate_up = torch.empty(2 * inter, hidden, dtype=dtype)
        down = torch.empty(hidden, inter, dtype=dtype)
        decompress_expert(layer, expert, image, gate_up, down, backend)
        outs[backend] = (gate_up, down)
    w = list(weights.values())
    assert bit_equal(outs["auto"][0], torch.cat(w[:2]))
    assert bit_equal(outs["auto"][1], w[2])
    assert bit_equal(outs["reference"][0], outs["auto"][0])
    assert bit_equal(outs["reference"][1], outs["auto"][1])


def test_experts_not_stored_last_are_rejected(moe, tmp_path):
    path, _, _ = moe("qwen3_moe")
    copy = tmp_path / "ckpt"
    shutil.copytree(path, copy)
    shard = sorted(copy.glob("model-*.safetensors"))[0]
    with EndorFile(shard) as f:
        meta = f.metadata()
        tensors = {n: f.get_compressed(n) if f.is_compressed(n) else f.get_tensor(n)
                   for n in f.keys()}
    save_file(tensors, shard, metadata=meta)  # the safetensors library's order: by dtype
    with pytest.raises(FormatError, match="convert it again|convert the checkpoint again"):
        load_model(copy, max_memory=0)


@pytest.mark.parametrize("verify", [True, False])
def test_a_corrupt_expert_on_disk_fails_typed(moe, tmp_path, verify):
    """Checked reads: a changed expert is a FormatError. load_model(verify=False), which exists
    to measure what checking costs, reads experts unchecked like layer shards (the bytes here
    are a flipped bit in the values: decodable, wrong)."""
    path, _, _ = moe("mixtral")
    copy = tmp_path / "ckpt"
    shutil.copytree(path, copy)
    model = load_model(copy, max_memory=0, verify=verify)
    try:
        for shard in sorted(copy.glob("model-*.safetensors"))[:-1]:
            with EndorFile(shard) as f:
                values = [f.byte_ranges(n)[1] for n in f.keys() if parse_expert_name(n)]
            # In place, same size: the stream is already reading these shards, and a file
            # truncated and rewritten under it can read short (an OSError, not this test's case).
            with open(shard, "r+b") as out:
                for lo, hi in values:  # every expert changes: whichever the router picks
                    out.seek(lo)
                    byte = out.read(1)
                    out.seek(lo)
                    out.write(bytes([byte[0] ^ 0x40]))
        if verify:
            with pytest.raises(FormatError, match="checksum mismatch"):
                greedy(model, PROMPT, NEW_TOKENS)
        else:  # no digest compared: the run goes on (or a decoder rule, never a checksum)
            try:
                greedy(model, PROMPT, NEW_TOKENS)
            except FormatError as e:
                assert "checksum" not in str(e)
            assert model.endor_stats()["verify"] is False
    finally:
        model.endor_close()


def test_manifest_records_how_experts_were_pruned(moe):
    path, _, _ = moe("qwen2_moe")
    manifest = json.loads((path / "endor.json").read_text())
    assert manifest["expert_pruning"] == "magnitude"
    with EndorFile(sorted(path.glob("model-*.safetensors"))[0]) as f:
        assert f.is_compressed("model.layers.0.mlp.experts.5.down_proj.weight")
        assert f.is_compressed("model.layers.0.mlp.shared_expert.up_proj.weight")
        assert not f.is_compressed("model.layers.0.mlp.gate.weight")  # the router stays dense


@pytest.mark.gpu
@pytest.mark.parametrize("offload", ["disk", "cpu"])
def test_routed_experts_on_the_gpu_match_the_model_in_gpu_memory(moe, offload):
    path, _, _ = moe("qwen2_moe")
    reference, _ = load_in_memory(path, device="cuda")
    expected = greedy(reference, PROMPT.cuda(), NEW_TOKENS)
    model = load_model(path, device="cuda", offload=offload, max_memory=0)
    try:
        assert greedy(model, PROMPT.cuda(), NEW_TOKENS) == expected
        stats = model.endor_stats()
        assert stats["expert_misses"] > 0 if offload == "disk" else \
            stats["expert_held_bytes"] > 0
    finally:
        model.endor_close()
