"""Fused compute in the runtime (src/endor/runtime/fused.py): decoder Linear weights stay
compressed, resident or streamed, and greedy generation matches the in-memory dense model on the
test models (the fused sum order is not torch's, so this is checked, not assumed)."""

import math

import pytest
import torch

from endor.runtime import open_model
from endor.runtime.fused import EndorLinear, resolve_compute
from tests.runtime.checkpoints import greedy
from tests.conftest import NEW_TOKENS, PROMPT

ARCHS = ["llama", "qwen2", "opt", "gemma3"]


def endor_linears(model):
    return [m for m in model.modules() if isinstance(m, EndorLinear)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("max_memory", [None, 0])
def test_fused_generation_matches_the_dense_model(tiny, arch, max_memory):
    path, reference, want = tiny(arch, "endor")
    with open_model(path, max_memory=max_memory, compute="fused") as model:
        assert greedy(model, PROMPT, NEW_TOKENS) == want
        stats = model.endor_stats()
        linears = endor_linears(model)
        # Outside a forward a streamed layer holds no weight; a resident one holds its own.
        assert all((m.et is None) == (max_memory == 0) for m in linears)
    n = reference.config.num_hidden_layers
    assert stats["compute"] == "fused" and stats["fused_layers"] == n
    layer_list = next(m for m in reference.modules()
                      if isinstance(m, torch.nn.ModuleList) and len(m) == n)
    assert len(linears) == sum(isinstance(m, torch.nn.Linear) for m in layer_list.modules())
    if max_memory == 0:
        assert stats["dense_slots"] >= 1 and stats["buffer_device_bytes"] < \
            stats["streamed_dense_bytes"] / n / 4  # no dense slot worth a layer


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_prefill_past_the_fused_rows_decompresses_and_still_matches(tiny, arch):
    path, _, want = tiny(arch, "endor")
    with open_model(path, max_memory=0, compute="fused") as model:
        for m in endor_linears(model):
            m.max_fused_rows = 4  # the 8-token prompt takes the GEMM path, decode the fused one
        assert greedy(model, PROMPT, NEW_TOKENS) == want


def test_budget_counts_compressed_bytes(tiny):
    path, _, want = tiny("llama", "endor")
    with open_model(path, max_memory=0, compute="dense") as probe:
        rest = probe.endor_stats()["resident_bytes"]
        dense_layer = probe.endor_stats()["streamed_dense_bytes"] // 4
    budget = rest + 2 * dense_layer
    with open_model(path, max_memory=budget, compute="dense") as dense:
        dense_resident = len(dense.endor_stats()["resident_layers"])
    with open_model(path, max_memory=budget, compute="fused") as model:
        assert greedy(model, PROMPT, NEW_TOKENS) == want
        stats = model.endor_stats()
    assert dense_resident == 2
    assert len(stats["resident_layers"]) > dense_resident
    assert stats["resident_bytes"] <= budget


def test_plan_counts_resident_fused_layers_at_their_stored_size(tiny):
    """The budget pays for a resident fused layer what its shard stores (bitmap, tile index,
    values of each Linear weight; the dense norms), not the dense size; the plan adds up to
    exactly that, read here from the shard headers."""
    from endor.checkpoint import Checkpoint
    from endor.format import EndorFile
    path, _, _ = tiny("llama", "endor")
    stored, dense = [], []
    for shard in Checkpoint(path).shards:
        if shard.group == "rest":
            continue
        with EndorFile(path / shard.file) as f:
            stored.append(sum(end - start for n in f.keys() for start, end in f.byte_ranges(n)))
            dense.append(sum(math.prod(f.entry(n).shape) * f.entry(n).dtype.itemsize
                             if f.is_compressed(n) else
                             f.header.tensors[n].end - f.header.tensors[n].start
                             for n in f.keys()))
    with open_model(path, max_memory=0, compute="fused") as probe:
        rest = probe.endor_memory_plan.rest_bytes
    budget = rest + stored[0] + stored[1] + stored[2] // 2  # two fused layers and a half
    with open_model(path, max_memory=budget, compute="fused") as model:
        plan = model.endor_memory_plan
        held = [m.et is not None for m in endor_linears(model)]
    assert list(plan.layer_bytes) == stored and all(s < d for s, d in zip(stored, dense))
    assert plan.resident == (0, 1) and held.count(True) == 2 * 7  # 7 Linears per layer
    assert plan.resident_bytes == rest + stored[0] + stored[1] <= budget
    with open_model(path, max_memory=budget, compute="dense") as model:
        assert list(model.endor_memory_plan.layer_bytes) == dense
        assert model.endor_memory_plan.resident == (0,)  # 2.5 fused layers < 2 dense ones


def test_compute_option():
    cpu = torch.device("cpu")
    assert resolve_compute("dense", cpu, "endor") == "dense"
    assert resolve_compute("auto", cpu, "dense") == "dense"
    assert resolve_compute("auto", cpu, "endor") == "auto"
    with pytest.raises(ValueError, match="compute must be one of"):
        resolve_compute("sparse", cpu, "endor")


def test_dense_checkpoint_with_fused_compute_runs_dense(tiny):
    path, _, want = tiny("qwen2", "dense")
    with open_model(path, max_memory=0, compute="fused") as model:
        assert greedy(model, PROMPT, NEW_TOKENS) == want
        assert model.endor_stats()["fused_layers"] == 0


@pytest.mark.parametrize("values", ["raw", "exp"])
def test_auto_fuses_the_layers_whose_codec_the_kernel_reads(tmp_path, values):
    from endor.runtime.fused import fused_codecs
    from tests.runtime.checkpoints import pruned_model, write_checkpoint
    # the CPU kernel reads raw and exp (kernels/cpu/fused.c); the reference reads every codec
    fused = values in fused_codecs(torch.device("cpu"))
    model = pruned_model("llama")
    path = write_checkpoint(model, tmp_path / values, weights="endor", values=values)
    want = greedy(model, PROMPT, NEW_TOKENS)
    with open_model(path, max_memory=0, compute="auto") as m:
        assert greedy(m, PROMPT, NEW_TOKENS) == want
        stats = m.endor_stats()
    assert stats["compute"] == "auto"
    assert stats["fused_layers"] == (model.config.num_hidden_layers if fused else 0)
    # streamed, fused or not: one core stays with the loader on this 2-core machine
    assert stats["compute_threads"] <= max(1, torch.get_num_threads())


def test_the_switch_table_covers_every_codec_and_dtype_the_kernel_reads():
    from endor.kernels.cpu.fused import CODECS
    from endor.runtime.fused import FUSED_MAX_ROWS
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for codec in CODECS:
            assert FUSED_MAX_ROWS[(dtype, codec)] >= 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("codec", ["raw", "exp", "int4"])
def test_endor_linear_switches_at_its_dtype_and_codec_limit(monkeypatch, dtype, codec):
    """Up to max_fused_rows(dtype, codec) rows of x the fused kernel runs, one more row
    decompresses and runs a GEMM; both give what the dense weight gives, within the bound."""
    import endor
    from endor.kernels.fused import error_bound
    from endor.runtime import fused
    from tests.helpers import sparse_tensor
    weight = sparse_tensor((7, 45), dtype, 0.5)
    options = {"group_size": 16} if codec == "int4" else {}
    et = endor.compress(weight, values=codec, **options)
    dense = endor.decompress(et).view(7, 45)
    module = EndorLinear(torch.nn.Linear(45, 7, bias=False, dtype=dtype))
    module.et = et
    limit = fused.max_fused_rows(dtype, codec)
    assert module.max_fused_rows is None and limit == fused.FUSED_MAX_ROWS[(dtype, codec)]
    calls = []
    real = fused.linear
    monkeypatch.setattr(fused, "linear", lambda *a: calls.append("fused") or real(*a))
    for rows, path in ((limit, "fused"), (limit + 1, "gemm")):
        calls.clear()
        x = torch.randn(1, rows, 45).to(dtype)
        y = module(x)
        assert calls == ([path] if path == "fused" else [])
        want = torch.nn.functional.linear(x.double(), dense.double())
        assert ((y.double() - want).abs() <=
                2 * error_bound(x[0], dense, None, want[0], dtype)).all()
    module.max_fused_rows = 2  # an explicit limit still wins over the table
    calls.clear()
    module(torch.randn(3, 45).to(dtype))
    assert calls == []
