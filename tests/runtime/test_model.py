import json
import shutil
import threading

import pytest
import torch

import endor
from endor.checkpoint import Checkpoint
from endor.runtime import load_model, open_model
from tests.runtime.checkpoints import greedy
from tests.conftest import NEW_TOKENS, PROMPT

ARCHS = ["llama", "qwen2", "opt", "gemma3"]


def endor_threads():
    return [t for t in threading.enumerate() if t.name.startswith("endor-")]


def shard_paths(ckpt_dir):
    ckpt = Checkpoint(ckpt_dir)
    return {s.group: ckpt.path / s.file for s in ckpt.shards}


def flip_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def values_offset(path):
    """Absolute offset of the middle of the first Endor tensor's first value part (whatever
    its codec) in a shard."""
    with endor.open_file(path) as f:
        name = next(n for n in f.keys() if f.is_compressed(n))
        start, end = next(r for part, r in f.part_ranges(name).items()
                          if part not in ("bitmap", "tiles"))
    return (start + end) // 2


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("weights", ["endor", "dense"])
@pytest.mark.parametrize("offload", ["disk", "cpu"])
def test_every_layer_streamed_is_token_identical(tiny, arch, weights, offload):
    path, reference, want = tiny(arch, weights)
    with open_model(path, max_memory=0, offload=offload) as model:
        assert greedy(model, PROMPT, NEW_TOKENS) == want
        stats = model.endor_stats()
    n = reference.config.num_hidden_layers
    assert stats["streamed_layers"] == list(range(n)) and stats["resident_layers"] == []
    assert stats["decode_tokens"] == NEW_TOKENS - 1
    assert stats["prefill_tokens"] == PROMPT.shape[1]
    shards = shard_paths(path)
    streamed_bytes = sum(shards[f"layers.{i}"].stat().st_size for i in range(n))
    assert stats["bytes_moved_per_token"] == streamed_bytes
    assert stats["bytes_read_per_token"] == (streamed_bytes if offload == "disk" else 0)
    assert stats["held_host_bytes"] >= (streamed_bytes if offload == "cpu" else 0)


@pytest.mark.parametrize("weights", ["endor", "dense"])
def test_buffered_io_is_token_identical(tiny, weights):
    path, _, want = tiny("llama", weights)
    with open_model(path, max_memory=0, direct_io=False) as model:
        assert greedy(model, PROMPT, NEW_TOKENS) == want
        stats = model.endor_stats()
    assert stats["direct_io"] is False and stats["direct_io_fallback"] == "disabled"


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("prefetch", [0, 2])
def test_some_layers_resident_is_token_identical(tiny, arch, prefetch):
    path, reference, want = tiny(arch, "endor")
    with open_model(path, max_memory=0) as probe:
        rest = probe.endor_stats()["resident_bytes"]
        per_layer = probe.endor_stats()["streamed_dense_bytes"] // 4
    with open_model(path, max_memory=rest + 2 * per_layer, prefetch=prefetch,
                    compute="dense") as model:  # dense layers count in the budget
        assert greedy(model, PROMPT, NEW_TOKENS) == want
        stats = model.endor_stats()
    assert stats["resident_layers"] == [0, 1] and stats["streamed_layers"] == [2, 3]
    assert stats["read_slots"] == min(prefetch + 1, 2)
    assert stats["dense_slots"] == 1


def test_no_budget_keeps_everything_resident(tiny):
    path, _, want = tiny("qwen2", "endor")
    model = load_model(path)
    assert greedy(model, PROMPT, NEW_TOKENS) == want
    stats = model.endor_stats()
    assert stats["streamed_layers"] == [] and stats["bytes_read_per_token"] == 0
    assert endor_threads() == []


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_is_what_load_in_memory_gives(tiny, arch):
    """The pruned model the fixtures compare against generates what endor.reference_loader's in-memory
    reference of the same checkpoint generates."""
    from endor.reference_loader import load_in_memory

    path, _, want = tiny(arch, "endor")
    reference, _ = load_in_memory(path)
    assert greedy(reference, PROMPT, NEW_TOKENS) == want


def test_repeated_generate_and_reset_stats(tiny):
    path, _, want = tiny("llama", "endor")
    with open_model(path, max_memory=0, prefetch=2) as model:
        assert greedy(model, PROMPT, NEW_TOKENS) == want
        model.endor_reset_stats()
        assert greedy(model, PROMPT, NEW_TOKENS) == want
        assert model.endor_stats()["decode_tokens"] == NEW_TOKENS - 1


def test_budget_below_what_must_stay_resident_is_an_error(tiny):
    path, _, want = tiny("llama", "endor")
    # 1 KB is below the embeddings and head (12 KB): they are read on demand (runtime/rest.py)
    with open_model(path, max_memory="1KB") as model:
        assert greedy(model, PROMPT, NEW_TOKENS) == want
    # 100 bytes cannot hold the final norm and one row of the streamed head
    with pytest.raises(ValueError, match="smaller than the weights outside the decoder layers"):
        load_model(path, max_memory="100B")
    assert endor_threads() == []


@pytest.mark.parametrize("kwargs, error", [
    ({"offload": "nvme"}, "offload must be one of"),
    ({"prefetch": -1}, "prefetch must be"),
    ({"device": "tpu"}, "device must be"),
    ({"backend": "nope"}, "unknown backend"),
    ({"max_memory": "lots"}, "cannot read size"),
])
def test_bad_arguments(tiny, kwargs, error):
    path, _, _ = tiny("llama", "endor")
    with pytest.raises(ValueError, match=error):
        load_model(path, **kwargs)


def test_missing_checkpoint_and_missing_shard(tiny, tmp_path):
    with pytest.raises(endor.FormatError, match="not an Endor checkpoint"):
        load_model(tmp_path)
    path, _, _ = tiny("llama", "endor")
    broken = shutil.copytree(path, tmp_path / "ckpt")
    shard_paths(broken)["layers.2"].unlink()
    with pytest.raises(endor.FormatError, match="missing"):
        load_model(broken, max_memory=0)


def test_corrupt_shard_fails_at_load(tiny, tmp_path):
    path, _, _ = tiny("llama", "endor")
    broken = shutil.copytree(path, tmp_path / "ckpt")
    shard = shard_paths(broken)["layers.1"]
    flip_byte(shard, values_offset(shard))
    for budget in (0, None):  # streamed or resident: checked before any generation
        with pytest.raises(endor.FormatError, match="checksum mismatch") as e:
            load_model(broken, max_memory=budget)
        assert shard.name in str(e.value)
    assert endor_threads() == []


def dense_offset(path):
    """Absolute offset of the middle of the largest dense tensor in a shard."""
    with endor.open_file(path) as f:
        start, end = max((f.byte_ranges(n)[0] for n in f.keys() if not f.is_compressed(n)),
                         key=lambda r: r[1] - r[0])
    return (start + end) // 2


@pytest.mark.parametrize("weights, group", [("endor", "layers.1"), ("endor", "rest"),
                                            ("dense", "layers.1"), ("dense", "rest")])
def test_corrupt_dense_tensor_fails_at_load(tiny, tmp_path, weights, group):
    """Dense tensors carry a checksum too (format v2): a flipped byte in a norm, an embedding or
    a dense layer is an error at load, streamed or resident, never garbage tokens."""
    path, _, _ = tiny("llama", weights)
    broken = shutil.copytree(path, tmp_path / "ckpt")
    shard = shard_paths(broken)[group]
    flip_byte(shard, dense_offset(shard))
    for budget in (0, None):
        with pytest.raises(endor.FormatError, match="checksum mismatch") as e:
            load_model(broken, max_memory=budget)
        assert shard.name in str(e.value)
    assert endor_threads() == []


def test_config_that_does_not_match_the_weights(tiny, tmp_path):
    path, _, _ = tiny("llama", "endor")
    broken = shutil.copytree(path, tmp_path / "ckpt")
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 48
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(endor.FormatError, match="shape"):
        load_model(broken, max_memory=0)


@pytest.mark.parametrize("weights", ["endor", "dense"])
def test_shard_corrupted_while_loaded_is_an_error_then_recovers(tiny, tmp_path, weights):
    path, _, want = tiny("llama", weights)
    ckpt = shutil.copytree(path, tmp_path / "ckpt")
    shard = shard_paths(ckpt)["layers.3"]  # not among the layers prefetched between calls
    original = shard.read_bytes()
    with open_model(ckpt, max_memory=0) as model:
        assert greedy(model, PROMPT, NEW_TOKENS) == want
        flip_byte(shard, len(original) - 3)
        with pytest.raises(endor.FormatError, match="checksum mismatch") as e:
            greedy(model, PROMPT, NEW_TOKENS)
        assert shard.name in str(e.value)
        shard.write_bytes(original)
        assert greedy(model, PROMPT, NEW_TOKENS) == want


def test_io_error_mid_generation_is_raised(tiny, tmp_path):
    path, _, want = tiny("llama", "endor")
    ckpt = shutil.copytree(path, tmp_path / "ckpt")
    shard = shard_paths(ckpt)["layers.3"]
    with open_model(ckpt, max_memory=0) as model:
        assert greedy(model, PROMPT, NEW_TOKENS) == want
        shard.unlink()
        with pytest.raises(FileNotFoundError):
            greedy(model, PROMPT, NEW_TOKENS)
    assert endor_threads() == []


def test_interrupted_forward_restarts_cleanly(tiny):
    path, _, want = tiny("gemma3", "endor")
    model = load_model(path, max_memory=0, prefetch=2)
    layers = model.model.layers
    fired = []

    def interrupt(module, args):
        if not fired:
            fired.append(True)
            raise KeyboardInterrupt

    handle = layers[2].register_forward_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        greedy(model, PROMPT, NEW_TOKENS)
    handle.remove()
    assert greedy(model, PROMPT, NEW_TOKENS) == want
    assert "endor-loader" in {t.name for t in endor_threads()}
    model.endor_close()
    assert endor_threads() == []
    with pytest.raises(RuntimeError, match="closed"):
        greedy(model, PROMPT, NEW_TOKENS)


def test_worker_error_reaches_the_caller(tiny, monkeypatch):
    import endor.runtime.stream as stream

    path, _, _ = tiny("llama", "endor")

    def broken(*args, **kwargs):
        raise RuntimeError("decompressor exploded")

    with open_model(path, max_memory=0, compute="dense") as model:  # the loader decodes
        monkeypatch.setattr(stream, "decompress", broken)
        with pytest.raises(RuntimeError, match="decompressor exploded"):
            greedy(model, PROMPT, NEW_TOKENS)


@pytest.mark.parametrize("weights", ["endor", "dense"])
def test_streaming_buffers_are_reported_and_sized_from_the_largest_layer(tiny, weights):
    path, reference, _ = tiny("opt", weights)
    shards = shard_paths(path)
    largest = max(shards[f"layers.{i}"].stat().st_size for i in range(4))
    with open_model(path, max_memory=0, prefetch=2, compute="dense") as model:
        stats = model.endor_stats()
    assert stats["read_slots"] == 3
    # read slots: the largest shard, rounded up to the O_DIRECT alignment, each
    assert 3 * largest <= stats["buffer_host_bytes"] < 3 * (largest + 4096)
    if weights == "dense":  # used in place: the dense slots hold nothing
        assert stats["dense_slots"] == 3 and stats["buffer_device_bytes"] == 3
    else:  # one dense slot: every weight of the largest layer (64-byte aligned)
        dense = max(sum(-(-t.numel() * t.element_size() // 64) * 64
                        for t in layer.state_dict().values())
                    for layer in reference.model.decoder.layers)
        assert stats["dense_slots"] == 1 and stats["buffer_device_bytes"] == dense


@pytest.mark.gpu
@pytest.mark.parametrize("weights", ["endor", "dense"])
@pytest.mark.parametrize("offload", ["disk", "cpu"])
def test_cuda_streaming_is_token_identical(tiny, weights, offload):
    from endor.reference_loader import load_in_memory

    path, _, _ = tiny("llama", weights)
    reference, _ = load_in_memory(path, device="cuda")  # GPU numerics differ from the CPU's
    want = greedy(reference, PROMPT.cuda(), NEW_TOKENS)
    with open_model(path, device="cuda", max_memory=0, offload=offload, prefetch=2) as model:
        assert greedy(model, PROMPT.cuda(), NEW_TOKENS) == want
        stats = model.endor_stats()
    assert stats["split_s_per_token"]["transfer"] > 0


def test_thread_split_gives_the_decompressor_a_core():
    from endor.runtime.model import thread_split

    cpu = torch.device("cpu")
    compute, decompress = thread_split(cpu, True)
    assert decompress >= 1 and compute >= 1
    assert thread_split(cpu, False) == (None, None)  # nothing streams: torch's setting stands
    assert thread_split(cpu, True, 3)[0] == 3


def test_compute_threads_apply_only_inside_the_forward(tiny):
    path, _, want = tiny("llama", "endor")
    before = torch.get_num_threads()
    seen = []
    with open_model(path, max_memory=0, compute_threads=1) as model:
        model.model.layers[0].register_forward_pre_hook(
            lambda m, a: seen.append(torch.get_num_threads()))
        assert greedy(model, PROMPT, NEW_TOKENS) == want
        assert model.endor_stats()["compute_threads"] == 1
    assert set(seen) == {1} and torch.get_num_threads() == before
