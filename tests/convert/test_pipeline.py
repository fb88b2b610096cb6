import json
import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

import endor
from endor import checkpoint
from endor.checkpoint import Checkpoint
from endor.convert import calibrate, convert, outdir, pipeline
from endor.convert.outdir import SettingsMismatch
from endor.format.equal import bit_equal
from endor.prune import CalibrationStats, needs_hessian, prune_weight
from tests.convert.conftest import CALIB_TEXT, SAMPLES, SEQLEN, make_model_dir

# On the CPU: the references here are computed there, and compared bit for bit.
CALIB = dict(calib_text=CALIB_TEXT, calib_samples=SAMPLES, calib_seqlen=SEQLEN, progress=False,
             device="cpu")


def source_tensors(src) -> dict:
    out = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def converted(out) -> dict:
    ck = Checkpoint(out)
    return {name: ck.file_of(name).get_tensor(name) for name in sorted(ck.weight_map)}


def is_linear(name):
    return ".layers." in name and name.endswith("proj.weight")


def files_of(directory) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("kind,dtype", [("llama", torch.float32), ("llama", torch.bfloat16),
                                        ("qwen2", torch.float16)])
def test_magnitude_checkpoint_decompresses_to_the_pruned_weights(model_dirs, tmp_path, kind,
                                                                 dtype):
    src = model_dirs(kind, dtype)
    summary = convert(src, tmp_path / "out", method="magnitude", sparsity=0.5, progress=False)
    want = source_tensors(src)
    got = converted(tmp_path / "out")
    ck = Checkpoint(tmp_path / "out")
    if kind == "llama":  # tied: the head is not stored twice
        assert "lm_head.weight" in want and "lm_head.weight" not in got
        want.pop("lm_head.weight")
    assert set(got) == set(want)
    for name, w in want.items():
        expected = prune_weight(w, method="magnitude", sparsity=0.5) if is_linear(name) else w
        assert bit_equal(got[name], expected), name
        assert got[name].dtype == dtype
        assert ck.file_of(name).is_compressed(name) == is_linear(name)
    assert len(ck.shards) == 4 and [s.group for s in ck.shards][-1] == "rest"
    for i in range(3):  # one shard per decoder layer, holding exactly that layer
        f = ck.open(ck.group_shards()[f"layers.{i}"].file)
        assert all(n.startswith(f"model.layers.{i}.") for n in f.keys())
    assert set(summary["by_type"]) == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                       "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
                                       "mlp.down_proj"}
    for row in summary["by_type"].values():
        assert abs(row["sparsity"] - 0.5) <= 0.005
    manifest = json.loads((tmp_path / "out" / "endor.json").read_text())
    assert manifest["summary"] == {k: v for k, v in summary.items() if k != "run"}
    assert manifest["method"] == "magnitude" and manifest["weights"] == "endor"
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    # config.json: the source's, plus what tells transformers it is an Endor checkpoint
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {
        **json.loads((src / "config.json").read_text()),
        "quantization_config": {"quant_method": "endor", "checkpoint_version": 1},
        "transformers_weights": checkpoint.HF_GUARD_FILE}
    assert summary["total"]["ratio"] > 1.2


def reference_calibrated_prune(src, method, sparsity, nm=None, damping=None) -> dict:
    """The obviously correct scheme, on the whole model in memory: for each layer in turn, run the
    full model (earlier layers already pruned) on the calibration segments, with every Linear of
    that layer feeding its own statistics, then prune that layer's Linears in place."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    tokens = calibrate.segments(calibrate.tokenize(src, CALIB_TEXT), SAMPLES, SEQLEN)
    for layer in model.model.layers:
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        stats = {n: CalibrationStats(m.in_features, hessian=needs_hessian(method))
                 for n, m in linears.items()}
        hooks = [m.register_forward_pre_hook(lambda mod, args, s=stats[n]: s.update(args[0]))
                 for n, m in linears.items()]
        with torch.no_grad():
            for seg in tokens:
                model(input_ids=seg[None], use_cache=False)
        for h in hooks:
            h.remove()
        for n, m in linears.items():
            m.weight.data = prune_weight(m.weight.data, method=method, sparsity=sparsity, nm=nm,
                                         stats=stats[n], damping=damping)
    return model.state_dict()


@pytest.mark.parametrize("method,nm", [("wanda", None), ("sparsegpt", None), ("wanda", (2, 4))])
def test_calibrated_methods_match_the_in_memory_reference(model_dirs, tmp_path, method, nm):
    src = model_dirs("qwen2", torch.float32)
    summary = convert(src, tmp_path / "out", method=method, sparsity=0.5, nm=nm, **CALIB)
    got = converted(tmp_path / "out")
    want = reference_calibrated_prune(src, method, 0.5, nm)
    assert set(got) == set(want)
    for name in got:
        assert bit_equal(got[name], want[name]), name
    for row in summary["by_type"].values():
        assert abs(row["sparsity"] - 0.5) <= 0.005
    if nm is not None:  # every group of 4 inputs keeps at most 2
        w = got["model.layers.1.mlp.down_proj.weight"]
        assert int((w.view(-1, 4) != 0).sum(dim=1).max()) <= 2


def test_sparsegpt_damping_is_used_and_recorded(model_dirs, tmp_path):
    src = model_dirs("qwen2", torch.float32)
    convert(src, tmp_path / "out", method="sparsegpt", sparsity=0.5, damping=0.01, **CALIB)
    got = converted(tmp_path / "out")
    want = reference_calibrated_prune(src, "sparsegpt", 0.5, damping=0.01)
    default = reference_calibrated_prune(src, "sparsegpt", 0.5)
    name = "model.layers.1.mlp.down_proj.weight"
    assert not bit_equal(want[name], default[name])  # the option changes the result
    for name in got:
        assert bit_equal(got[name], want[name]), name
    manifest = json.loads((tmp_path / "out" / "endor.json").read_text())
    assert manifest["calibration"]["damping"] == 0.01
    for bad in (0, -1.0, float("nan"), 1e9, "0.1"):
        with pytest.raises(ValueError, match="damping must be"):
            convert(src, tmp_path / "bad", method="sparsegpt", damping=bad, **CALIB)
    with pytest.raises(ValueError, match="damping applies to method 'sparsegpt' only"):
        convert(src, tmp_path / "bad", method="wanda", damping=0.01, **CALIB)


def test_calibration_keeps_a_bfloat16_source_in_bfloat16(model_dirs, tmp_path):
    src = model_dirs("llama", torch.bfloat16)
    summary = convert(src, tmp_path / "out", method="wanda", sparsity=0.625, **CALIB)
    got = converted(tmp_path / "out")
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    for row in summary["by_type"].values():
        assert abs(row["sparsity"] - 0.625) <= 0.005


def test_gemma3_sliding_and_global_layers_calibrate(model_dirs, tmp_path):
    summary = convert(model_dirs("gemma3", torch.float32), tmp_path / "out", method="sparsegpt",
                      sparsity=0.5, **CALIB)
    assert len(summary["by_layer"]) == 4
    assert all(abs(s - 0.5) <= 0.005 for s in summary["by_layer"])


def test_method_none_keeps_an_already_pruned_checkpoint_exactly(tmp_path):
    def prune_some(model):
        for name, p in model.named_parameters():
            if is_linear(name):
                p[torch.rand_like(p) < 0.7] = 0.0
                p.view(-1)[::97] = -0.0  # -0.0 is data, not a zero: it must survive
    src = make_model_dir(tmp_path / "src", "llama", dtype=torch.float16, edit=prune_some)
    summary = convert(src, tmp_path / "out", method="none", progress=False)
    want = source_tensors(src)
    want.pop("lm_head.weight")
    got = converted(tmp_path / "out")
    for name, w in want.items():
        assert bit_equal(got[name], w), name
    q = summary["by_type"]["self_attn.q_proj"]
    zeros = sum(int((want[n].view(torch.int16) == 0).sum()) for n in want
                if n.endswith("q_proj.weight"))
    assert q["numel"] - q["nnz"] == zeros and 0.6 < q["sparsity"] < 0.75


def test_dense_format_equals_endor_and_loads_in_transformers(model_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    src = model_dirs("qwen2", torch.float32)
    convert(src, tmp_path / "endor", method="magnitude", sparsity=0.5, progress=False)
    convert(src, tmp_path / "dense", method="magnitude", sparsity=0.5, weights="dense",
            progress=False)
    endor_t, dense_t = converted(tmp_path / "endor"), converted(tmp_path / "dense")
    assert set(endor_t) == set(dense_t)
    assert all(bit_equal(endor_t[n], dense_t[n]) for n in endor_t)
    assert not any(endor.open_file(p).dense_names != sorted(endor.open_file(p).keys())
                   for p in (tmp_path / "dense").glob("model-*.safetensors"))

    reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if is_linear(name):
                p.copy_(prune_weight(p, method="magnitude", sparsity=0.5))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, reference(ids).logits)


def test_dense_twin_of_an_endor_checkpoint_is_not_pruned_again(model_dirs, tmp_path):
    """The demo's two calls: prune once into A, then A's dense twin B (and A re-compressed C)."""
    from transformers import AutoModelForCausalLM

    src = model_dirs("llama", torch.bfloat16)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    convert(src, a, method="wanda", sparsity=0.5, weights="endor", **CALIB)
    twin = convert(a, b, method="none", weights="dense", progress=False)
    pruned = converted(a)
    assert converted(b).keys() == pruned.keys()
    assert all(bit_equal(converted(b)[n], t) for n, t in pruned.items())
    assert not any(Checkpoint(b).file_of(n).is_compressed(n) for n in pruned)
    for side_file in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (b / side_file).read_bytes() == (src / side_file).read_bytes()
    manifest = json.loads((b / "endor.json").read_text())
    assert manifest["method"] == "none" and manifest["weights"] == "dense"
    assert [p["method"] for p in manifest["prior_pruning"]] == ["wanda"]
    assert manifest["prior_pruning"][0]["calibration"]["samples"] == SAMPLES
    assert abs(twin["decoder_linear"]["sparsity"] - 0.5) <= 0.005

    model = AutoModelForCausalLM.from_pretrained(b, dtype=torch.bfloat16).eval()
    state = model.state_dict()
    assert all(bit_equal(state[n], t) for n, t in pruned.items())

    convert(a, c, method="none", weights="endor", progress=False)  # re-compressed: same parts
    ck_a, ck_c = Checkpoint(a), Checkpoint(c)
    for name in pruned:
        fa, fc = ck_a.file_of(name), ck_c.file_of(name)
        assert fa.is_compressed(name) == fc.is_compressed(name)
        if fa.is_compressed(name):
            assert fa.get_compressed(name).checksum == fc.get_compressed(name).checksum

    assert convert(a, b, method="none", weights="dense", progress=False)[
        "run"]["shards_written"] == 0  # resumes: nothing to do
    convert(src, a, method="wanda", sparsity=0.625, resume=False, **CALIB)
    with pytest.raises(SettingsMismatch, match="source"):  # A changed under B
        convert(a, b, method="none", weights="dense", progress=False)


class Killed(BaseException):
    """Stands in for SIGKILL: nothing in the pipeline may catch it."""


def kill_after(monkeypatch, shards: int):
    """The process "dies" right after the `shards`-th shard is written and verified."""
    real, calls = pipeline._Conversion._shard_done, []

    def done_then_maybe_die(self, group):
        real(self, group)
        calls.append(group)
        if len(calls) == shards:
            raise Killed
    monkeypatch.setattr(pipeline._Conversion, "_shard_done", done_then_maybe_die)


@pytest.mark.parametrize("method", ["magnitude", "sparsegpt"])
def test_resume_after_a_kill_gives_byte_identical_files(model_dirs, tmp_path, monkeypatch, method):
    src = model_dirs("llama", torch.float32)
    convert(src, tmp_path / "whole", method=method, sparsity=0.5, **CALIB)
    with monkeypatch.context() as m:
        kill_after(m, 2)  # the rest shard and layer 0 are written, then the process "dies"
        with pytest.raises(Killed):
            convert(src, tmp_path / "resumed", method=method, sparsity=0.5, **CALIB)
    assert not (tmp_path / "resumed" / "endor.json").exists()
    (tmp_path / "resumed" / "model-00002-of-00004.safetensors.tmp").write_bytes(b"half a shard")
    summary = convert(src, tmp_path / "resumed", method=method, sparsity=0.5, **CALIB)
    assert summary["run"]["shards_skipped"] == 2 and summary["run"]["shards_written"] == 2
    assert files_of(tmp_path / "resumed") == files_of(tmp_path / "whole")
    again = convert(src, tmp_path / "resumed", method=method, sparsity=0.5, **CALIB)
    assert again["run"]["shards_written"] == 0
    assert files_of(tmp_path / "resumed") == files_of(tmp_path / "whole")


def test_resuming_with_other_settings_is_refused(model_dirs, tmp_path, monkeypatch):
    src = model_dirs("llama", torch.float32)
    out = tmp_path / "out"
    convert(src, out, method="magnitude", sparsity=0.5, progress=False)
    with pytest.raises(SettingsMismatch, match=r"sparsity.*0\.5.*0\.6.*--overwrite"):
        convert(src, out, method="magnitude", sparsity=0.6, progress=False)
    with pytest.raises(SettingsMismatch, match="weights"):
        convert(src, out, method="magnitude", sparsity=0.5, weights="dense", progress=False)
    # an interrupted OUT (no endor.json yet) is checked through its shards' metadata
    partial = tmp_path / "partial"
    with monkeypatch.context() as m:
        kill_after(m, 1)
        with pytest.raises(Killed):
            convert(src, partial, method="magnitude", sparsity=0.5, progress=False)
    with pytest.raises(SettingsMismatch, match="method"):
        convert(src, partial, method="none", progress=False)
    other = make_model_dir(tmp_path / "other", "llama", seed=1, tokenizer=False)
    with pytest.raises(SettingsMismatch, match="source"):
        convert(other, out, method="magnitude", sparsity=0.5, progress=False)
    summary = convert(src, out, method="magnitude", sparsity=0.7, resume=False, progress=False)
    assert abs(summary["decoder_linear"]["sparsity"] - 0.7) <= 0.005


def test_verification_catches_an_encoder_fault(model_dirs, tmp_path, monkeypatch):
    from endor.convert import pipeline

    def flipping_compress(t, **options):
        t = t.clone()
        t.view(-1)[0] = 1.0  # what would land on disk differs from what was meant
        return endor.compress(t, **options)
    monkeypatch.setattr(pipeline, "compress", flipping_compress)
    with pytest.raises(endor.FormatError, match="verification failed.*encoder"):
        convert(model_dirs("llama", torch.float32), tmp_path / "out", method="magnitude",
                progress=False)
    assert not list((tmp_path / "out").glob("model-00001-*"))


@pytest.mark.parametrize("weights", ["dense", "endor"])
def test_verification_catches_a_disk_fault_and_removes_the_shard(model_dirs, tmp_path,
                                                                 monkeypatch, weights):
    real = checkpoint.save_file

    def save_then_flip_a_byte(tensors, path, metadata=None, **options):
        real(tensors, path, metadata=metadata, **options)
        if "00001-of" in path.name:  # layer 0: flip a byte of its last tensor's data
            data = bytearray(path.read_bytes())
            data[-3] ^= 0x40
            path.write_bytes(bytes(data))
    monkeypatch.setattr(checkpoint, "save_file", save_then_flip_a_byte)
    with pytest.raises(endor.FormatError, match="verification failed.*disk"):
        convert(model_dirs("llama", torch.float32), tmp_path / "out", method="magnitude",
                weights=weights, progress=False)
    assert not list((tmp_path / "out").glob("model-00001-*"))


def test_keep_dense_patterns(model_dirs, tmp_path):
    src = model_dirs("llama", torch.float32)
    summary = convert(src, tmp_path / "out", method="magnitude", sparsity=0.5,
                      dense_patterns=["*.mlp.down_proj.weight", "model.layers.0.*"],
                      progress=False)
    ck = Checkpoint(tmp_path / "out")
    want = source_tensors(src)
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        assert not ck.file_of(name).is_compressed(name)
        assert bit_equal(ck.file_of(name).get_tensor(name), want[name])
    assert ck.file_of("model.layers.1.mlp.up_proj.weight").is_compressed(
        "model.layers.1.mlp.up_proj.weight")
    assert summary["by_type"]["mlp.down_proj"]["sparsity"] == 0.0
    with pytest.raises(ValueError, match="matches no decoder Linear"):
        convert(src, tmp_path / "x", method="magnitude", dense_patterns=["*.down.weight"],
                progress=False)


def test_corrupt_sources_are_clear_errors(tmp_path, llama_dir):
    import shutil

    missing = tmp_path / "missing"
    shutil.copytree(llama_dir, missing)
    victim = sorted(missing.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(endor.FormatError, match=f"{victim.name}.*missing"):
        convert(missing, tmp_path / "o1", progress=False)

    truncated = tmp_path / "truncated"
    shutil.copytree(llama_dir, truncated)
    victim = sorted(truncated.glob("model-*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(endor.FormatError, match="truncated"):
        convert(truncated, tmp_path / "o2", progress=False)

    with pytest.raises(FileNotFoundError):
        convert(tmp_path / "nowhere", tmp_path / "o3", progress=False)


def test_bad_arguments(llama_dir, tmp_path):
    out = tmp_path / "o"
    with pytest.raises(ValueError, match="unknown pruning method"):
        convert(llama_dir, out, method="random")
    with pytest.raises(ValueError, match="sparsity"):
        convert(llama_dir, out, method="magnitude", sparsity=1.5)
    with pytest.raises(ValueError, match="malformed"):
        convert(llama_dir, out, method="magnitude", nm=(5, 4))
    with pytest.raises(ValueError, match="pruning method"):
        convert(llama_dir, out, method="none", nm=(2, 4))
    with pytest.raises(ValueError, match="weights"):
        convert(llama_dir, out, weights="gzip")
    with pytest.raises(ValueError, match="must not be SRC"):
        convert(llama_dir, llama_dir)
    with pytest.raises(ValueError, match="must not be SRC"):
        convert(llama_dir, llama_dir.parent, resume=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        convert(llama_dir, tmp_path / "file")
    assert not out.exists()


def test_calibration_without_a_tokenizer_is_a_clear_error(tmp_path):
    src = make_model_dir(tmp_path / "src", tokenizer=False)
    with pytest.raises(ValueError, match="tokenizer"):
        convert(src, tmp_path / "out", method="wanda", **CALIB)


def test_summary_counts_every_byte(model_dirs, tmp_path):
    summary = convert(model_dirs("llama", torch.float32), tmp_path / "out", method="magnitude",
                      sparsity=0.75, progress=False)
    files = list((tmp_path / "out").glob("model-*.safetensors"))
    assert summary["total"]["stored_bytes"] == sum(f.stat().st_size for f in files)
    lin = summary["decoder_linear"]
    assert lin["numel"] == 3 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128)  # q,o + k,v + mlp
    assert math.isclose(lin["sparsity"], 0.75, abs_tol=0.005)
    # the format's size rule for float32: (1 - s) * 32 + 1 bits per element, plus tile index
    assert lin["stored_bytes"] < lin["numel"] * (0.25 * 32 + 1 + 0.1) / 8
