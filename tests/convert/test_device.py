"""--device: where calibrated methods run a layer; the CPU path is the reference, a GPU run is
compared with it (gpu marker). Progress: stages named, no bytes-per-second during calibration."""

import pytest
import torch

from endor.convert import calibrate, convert, pipeline
from endor.format.equal import bit_equal
from endor.convert.progress import ConversionProgress
from tests.convert.conftest import CALIB_TEXT, SAMPLES, SEQLEN
from tests.convert.test_pipeline import converted

CALIB = dict(calib_text=CALIB_TEXT, calib_samples=SAMPLES, calib_seqlen=SEQLEN, progress=False)


def test_resolve_device():
    assert pipeline.resolve_device("cpu") == torch.device("cpu")
    assert pipeline.resolve_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="cpu or cuda"):
        pipeline.resolve_device("tpu")
    with pytest.raises(ValueError, match="cpu or cuda"):
        pipeline.resolve_device("no such device")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            pipeline.resolve_device("cuda")


def test_layer_call_moves_every_tensor_argument():
    t = torch.ones(2)
    call = calibrate.LayerCall((t, (t, [t]), 3), {"mask": t, "pos": (t, t), "flag": None})
    moved = call.to("cpu")
    assert moved.args[2] == 3 and moved.kwargs["flag"] is None
    assert isinstance(moved.args[1], tuple) and isinstance(moved.args[1][1], list)
    assert torch.equal(moved.kwargs["pos"][1], t)


def test_activations_stay_on_the_cpu_for_the_cpu():
    hidden = [torch.randn(1, 5, 4) for _ in range(3)]
    placed = calibrate.place_activations(hidden, "cpu")
    assert all(p.device.type == "cpu" and torch.equal(p, h) for p, h in zip(placed, hidden))
    assert calibrate.activation_bytes(hidden) == 3 * 5 * 4 * 4


def test_progress_names_each_stage_and_shows_no_bytes_per_second_when_calibrating(
        model_dirs, tmp_path, monkeypatch):
    stages, postfixes = [], []
    real_stage, real_done = ConversionProgress.stage, ConversionProgress.shard_done

    def stage(self, layer, what):
        stages.append((layer, what))
        real_stage(self, layer, what)

    def shard_done(self, nbytes, *, layer):
        real_done(self, nbytes, layer=layer)
        postfixes.append(self.bar.postfix)
    monkeypatch.setattr(ConversionProgress, "stage", stage)
    monkeypatch.setattr(ConversionProgress, "shard_done", shard_done)
    convert(model_dirs("llama", torch.float32), tmp_path / "w", method="wanda", device="cpu",
            **CALIB)
    for i in range(3):  # the tiny llama has 3 decoder layers
        assert [w for layer, w in stages if layer == i][:3] == ["reading", "calibrating",
                                                                 "pruning"] or i == 0
        assert (i, "calibrating") in stages and (i, "pruning") in stages
    assert (None, "writing") in stages
    assert len(postfixes) == 4 and all("layers/s" in p and "B/s" not in p for p in postfixes)
    stages.clear(), postfixes.clear()
    convert(model_dirs("llama", torch.float32), tmp_path / "m", method="magnitude",
            progress=False)
    assert [s for s in stages if s[0] == 1] == [(1, "pruning + writing")]
    assert all("layers/s" in p and "B/s" in p for p in postfixes)


def test_explicit_cpu_equals_default_on_a_cpu_machine(model_dirs, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the default is the GPU here")
    src = model_dirs("llama", torch.float32)
    a = convert(src, tmp_path / "a", method="sparsegpt", device="cpu", **CALIB)
    b = convert(src, tmp_path / "b", method="sparsegpt", **CALIB)
    assert a["run"]["device"] == b["run"]["device"] == "cpu"
    got, want = converted(tmp_path / "a"), converted(tmp_path / "b")
    assert all(bit_equal(got[n], want[n]) for n in got)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_gpu_conversion_agrees_with_the_cpu(model_dirs, tmp_path, method):
    """Activations and Hessians summed in another order give slightly different scores: the
    masks agree on nearly every weight, and the kept weights are close."""
    src = model_dirs("qwen2", torch.float32)
    convert(src, tmp_path / "cpu", method=method, device="cpu", **CALIB)
    summary = convert(src, tmp_path / "gpu", method=method, device="cuda", **CALIB)
    assert summary["run"]["device"].startswith("cuda")
    cpu, gpu = converted(tmp_path / "cpu"), converted(tmp_path / "gpu")
    for name, w in cpu.items():
        if w.dim() != 2 or "layers" not in name:
            assert bit_equal(w, gpu[name]), name
            continue
        same_mask = ((w == 0) == (gpu[name] == 0)).float().mean().item()
        assert same_mask >= 0.97, (name, same_mask)
        if method == "wanda":  # no weight update: kept weights are the originals
            both = (w != 0) & (gpu[name] != 0)
            assert torch.equal(w[both], gpu[name][both]), name
