import threading
from pathlib import Path

import pytest
import torch

import endor
from endor.format.validate import Entry
from endor.runtime.metrics import Metrics
from endor.runtime.plan import LayerPlan, Part, TensorPlan
from endor.runtime.reader import ShardReader
from endor.runtime.stream import LayerStream, decompress_layer, read_slot_count
from endor.runtime.weights import check_streamed
from endor.format.equal import bit_equal
from tests.helpers import sparse_tensor


def _place(image: bytearray, offset: int, t: torch.Tensor) -> tuple[int, int]:
    raw = t.contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
    image[offset:offset + len(raw)] = raw
    return offset, offset + len(raw)


def test_decompress_layer_stages_unaligned_parts_and_casts():
    """Parts at odd offsets (no typed view possible) are staged into the dense buffer; a dense
    tensor stored in another dtype is cast; an aligned one in the model dtype is a view."""
    w = sparse_tensor((7, 13), torch.float16, 0.5)
    et = endor.compress(w, values="raw")
    bias32 = torch.randn(13)
    norm = torch.randn(5, dtype=torch.float16)
    image = bytearray(4096)
    b = _place(image, 1, et.bitmap)
    v = _place(image, 101, et.values)
    t = _place(image, 401, et.tiles)
    d = _place(image, 603, bias32)
    n = _place(image, 1024, norm)
    tensors = (
        TensorPlan("w", w.shape, torch.float16,
                   (Part(*b, torch.uint8), Part(*v, torch.float16, staging=0),
                    Part(*t, torch.int64, staging=256)), True, et.checksum, 512,
                   Entry(et.shape, et.dtype, et.nnz, et.checksum, "raw", {}),
                   ("bitmap", "values", "tiles")),
        TensorPlan("bias", bias32.shape, torch.float16, (Part(*d, torch.float32, staging=768),),
                   False, None, 896),
        TensorPlan("norm", norm.shape, torch.float16, (Part(*n, torch.float16),), False, None,
                   None),
    )
    plan = LayerPlan(0, Path("x"), len(image), tensors, 1024, 0)
    image_t = torch.frombuffer(image, dtype=torch.uint8)
    dense = torch.zeros(1024, dtype=torch.uint8)
    views = decompress_layer(plan, image_t, dense, "auto")
    assert bit_equal(views["w"], w)
    assert bit_equal(views["bias"], bias32.to(torch.float16))
    assert bit_equal(views["norm"], norm)
    assert views["norm"].data_ptr() == image_t.data_ptr() + 1024  # in place, no copy
    assert views["w"].data_ptr() == dense.data_ptr() + 512


@pytest.fixture
def streamed_llama(tiny):
    from endor.checkpoint import Checkpoint
    from endor.runtime.plan import plan_layer
    from endor.runtime.weights import layer_files

    path, model, _ = tiny("llama", "endor")
    files, _ = layer_files(Checkpoint(path))
    plans = []
    for i, f in enumerate(files):
        layer = model.model.layers[i]
        expected = {k: (v.shape, v.dtype) for k, v in layer.state_dict().items()}
        plans.append(plan_layer(i, f, f"model.layers.{i}.", expected))
    return plans, model


def _sized(n_layers: int, weight_bytes: int) -> list:
    return [LayerPlan(i, Path(f"l{i}"), 0, (), 0, weight_bytes) for i in range(n_layers)]


@pytest.mark.parametrize("prefetch", [0, 1, 3, 7])
def test_read_slots_of_dense_sized_shards_are_prefetch_plus_one(prefetch):
    layers = _sized(12, 100)
    assert read_slot_count(layers, prefetch, 0, 100) == prefetch + 1
    assert read_slot_count(layers, prefetch, 100, 100) == prefetch + 1  # never fewer


def test_smaller_shards_read_further_ahead_in_the_same_memory():
    layers = _sized(12, 90)
    # (3+1) dense layers' memory, less one dense slot: 270 bytes hold five 51-byte shards
    assert read_slot_count(layers, 3, 90, 51) == 5
    assert read_slot_count(layers, 3, 90, 54) == 5  # 5 * 54 = 270: the last shard that fits
    assert read_slot_count(layers, 3, 90, 55) == 4  # 5 * 55 > 270: back to prefetch+1
    assert read_slot_count(layers, 3, 0, 30) == 12  # capped at the layers there are
    assert read_slot_count(layers, 0, 90, 10) == 1  # prefetch 0: no read-ahead at all
    assert read_slot_count(_sized(3, 90), 7, 90, 10) == 3


@pytest.mark.parametrize("held", [False, True])
@pytest.mark.parametrize("prefetch, dense_slots", [(0, 1), (1, 1), (3, 1), (7, 1), (3, 2)])
def test_cyclic_schedule_serves_every_layer_in_any_order(streamed_llama, monkeypatch, held,
                                                         prefetch, dense_slots):
    import endor.runtime.stream as stream_module

    monkeypatch.setattr(stream_module, "DENSE_SLOTS", dense_slots)
    plans, model = streamed_llama
    reader = ShardReader()
    digests, images = check_streamed(plans, reader, hold=held, pin=False)
    stream = LayerStream(plans, device=torch.device("cpu"), prefetch=prefetch, backend="auto",
                         reader=None if held else reader, digests=digests, held=images,
                         metrics=Metrics())
    n_dense = min(dense_slots, prefetch + 1)
    assert len(stream.dense_slots) == n_dense
    if held:  # nothing is read: no reason for more than prefetch+1
        assert len(stream.read_slots) == min(prefetch + 1, len(plans))
    else:
        assert len(stream.read_slots) == read_slot_count(
            plans, prefetch, n_dense * max(p.dense_buffer_bytes for p in plans),
            max(p.file_size for p in plans))
    order = [0, 1, 2, 3] * 3 + [2, 3, 0, 1, 1, 0, 3]  # in order, then jumps (restarts)
    for i in order:
        views = stream.acquire(i)
        for name, want in model.model.layers[i].state_dict().items():
            assert bit_equal(views[name], want), (i, name)
        stream.release(i)
    stream.close()
    stream.close()  # idempotent
    reader.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("endor-")]
    with pytest.raises(RuntimeError, match="closed"):
        stream.acquire(0)


def test_metrics_count_each_consumed_load(streamed_llama):
    plans, _ = streamed_llama
    reader = ShardReader()
    digests, _ = check_streamed(plans, reader, hold=False, pin=False)
    metrics = Metrics()
    stream = LayerStream(plans, device=torch.device("cpu"), prefetch=1, backend="auto",
                         reader=reader, digests=digests, held=None, metrics=metrics)
    for phase in ("prefill", "decode", "decode"):
        metrics.begin_forward(phase, 4 if phase == "prefill" else 1)
        for i in range(4):
            stream.acquire(i)
            stream.release(i)
        metrics.end_forward()
    stream.close()
    s = metrics.summary()
    assert s["decode_tokens"] == 2 and s["prefill_tokens"] == 4
    assert s["bytes_read_per_token"] == sum(p.file_size for p in plans)
    assert s["phases"]["decode"]["layer_loads"] == 8
    split = s["split_s_per_token"]
    assert split["read"] > 0 and split["transfer"] == 0  # cpu: nothing to transfer
    # Every instant of a forward is either compute or a stall waiting for weights.
    assert split["compute"] + split["stall"] == pytest.approx(s["decode_s"] / 2)
