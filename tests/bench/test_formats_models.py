"""endor bench formats --source models (src/endor/bench/formats_models.py), on a tiny random
bfloat16 model: every decoder matrix of every pruned case is counted, round-trips bit-exactly in
every format, and the sizes are the sums of what each format stores per matrix."""

import math

import pytest
import torch

from endor import compress
from endor.bench import formats, formats_models
from endor.cli import build_parser
from endor.cli.bench import benchmark_params
from tests.evaluate.tiny_models import char_tokenizer, tiny_model

pytestmark = pytest.mark.slow  # four conversions (Wanda calibrates) of a tiny model: ~20 s

LAYERS, MATRICES_PER_LAYER = 2, 7  # q, k, v, o, gate, up, down


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny"
    tiny_model(dtype=torch.bfloat16).save_pretrained(path)
    char_tokenizer(add_bos=False).save_pretrained(path)
    return path


def _args(*extra):
    return benchmark_params(build_parser().parse_args(
        ["bench", "formats", "--source", "models", "--repeat", "1", "--warmup", "0",
         "--calib-samples", "2", *extra]))


@pytest.fixture(scope="module")
def doc(tiny_dir, tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    return formats.run(**_args("--models", str(tiny_dir), "--formats", "endor,endor-exp,zstd",
                               "--workdir", str(work))), work


def test_every_case_dtype_and_format_has_a_row(doc):
    d, _ = doc
    rows = d["results"]
    assert [(r["method"], r["pattern"], r["dtype"], r["format"]) for r in rows] == [
        (m, p, dt, f) for m in ("magnitude", "wanda") for p in ("50%", "2:4")
        for dt in ("bfloat16", "float16") for f in ("dense", "endor", "endor-exp", "zstd")]
    assert d["params"]["source"] == "models"
    assert d["params"]["models_used"] == {str(d["params"]["models"][0]): {
        "num_layers": LAYERS, "timed_layer": LAYERS // 2}}
    for r in rows:
        assert r["lossless"] and r["matrices"] == LAYERS * MATRICES_PER_LAYER
        assert 0.49 <= r["sparsity"] <= 0.6  # 2:4 keeps fewer where a group had 3 zeros
        assert r["n"] == 1 and r["decode_gbps"] > 0 and r["timed_bytes"] > 0
        if r["dtype"] == "bfloat16":
            assert r["cast_inexact"] == 0
        assert r["values_from"] == ("bfloat16 as stored in the model" if r["dtype"] == "bfloat16"
                                    else "the model's bfloat16 weights cast to float16")
        if r["format"] == "dense":
            assert r["bits_per_element"] == 16 and r["decode_vs_copy"] == 1.0


def test_sizes_are_the_sums_over_every_decoder_matrix(doc):
    d, work = doc
    model = d["params"]["models"][0]
    path = formats_models.checkpoint_dir(work, model, "wanda", "2:4")
    matrices = list(formats_models.decoder_matrices(path))
    assert len(matrices) == LAYERS * MATRICES_PER_LAYER
    assert {layer for layer, _, _ in matrices} == set(range(LAYERS))
    for _, name, w in matrices:  # 2:4: two zeros in every group of four inputs
        assert w.dtype == torch.bfloat16 and ".layers." in name
        assert bool(((w.view(-1, 4) == 0).sum(1) >= 2).all())
    for dtype, label in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16")):
        for values, fmt in (("raw", "endor"), ("exp", "endor-exp")):
            stored = sum(compress(w.to(dtype), values=values).nbytes for _, _, w in matrices)
            numel = sum(w.numel() for _, _, w in matrices)
            row = next(r for r in d["results"] if (r["method"], r["pattern"], r["dtype"],
                                                   r["format"]) == ("wanda", "2:4", label, fmt))
            assert row["stored_bytes"] == stored and row["numel"] == numel
            assert row["bits_per_element"] == pytest.approx(8 * stored / numel)
            if fmt == "endor-exp":
                ets = [compress(w.to(dtype), values="exp") for _, _, w in matrices]
                assert row["escapes"] == sum(et.codec_params["escapes"] for et in ets)
                assert 0 <= row["escape_fraction"] < 0.05
    bf16 = {r["format"]: r for r in d["results"] if (r["method"], r["pattern"], r["dtype"])
            == ("wanda", "2:4", "bfloat16")}
    assert bf16["endor-exp"]["bits_per_element"] < bf16["endor"]["bits_per_element"]
    # raw values: the kept elements at 16 bits, a 1-bit bitmap, per-tile offsets (a large share
    # of matrices this small)
    bound = formats.bits_bound(torch.bfloat16, bf16["endor"]["sparsity"])
    assert bound <= bf16["endor"]["bits_per_element"] < 16
    timed = sum(w.numel() * 2 for layer, _, w in matrices if layer == LAYERS // 2)
    assert bf16["endor"]["timed_bytes"] == timed
    assert math.isclose(bf16["endor"]["decode_gbps"],
                        timed / bf16["endor"]["timed_s"] / 1e9)


def test_workdir_keeps_the_checkpoints_and_temporary_ones_go(doc, tiny_dir, tmp_path,
                                                             monkeypatch):
    _, work = doc
    assert len(list(work.iterdir())) == 4  # magnitude and Wanda at 50% and 2:4
    monkeypatch.setattr(formats_models.tempfile, "tempdir", str(tmp_path))
    formats.run(**_args("--models", str(tiny_dir), "--formats", "endor", "--methods",
                        "magnitude", "--patterns", "50%", "--dtypes", "bf16"))
    assert not list(tmp_path.iterdir())


def test_bad_options_fail_in_one_line(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="--timed-layer 5 is not a decoder layer"):
        formats.run(**_args("--models", str(tiny_dir), "--formats", "endor", "--methods",
                            "magnitude", "--patterns", "50%", "--timed-layer", "5",
                            "--workdir", str(tmp_path)))
    with pytest.raises(SystemExit):
        _args("--methods", "obs")
    with pytest.raises(SystemExit):
        _args("--patterns", "1:4")


def test_draw(doc, tmp_path):
    from endor.bench import plot
    path = plot.draw("formats", doc[0], tmp_path / "formats.png")
    assert path.stat().st_size > 10_000
