"""SparseGPT's joint pruning + quantization (prune/sparsegpt.py JointGrid): the result is on the
int grid the codec stores (so compressing it is exact), it is as sparse as asked, keeps the mask
of raw SparseGPT, and its output error is lower than pruning with SparseGPT and then rounding to
nearest. Measured on these inputs with the default dampening (10%) and one scale refit, output
error over SparseGPT's without quantization: int4 joint 1.63-1.84 unstructured, 1.47-1.61 with
2:4, round-to-nearest 1.8-3.5 (joint over round-to-nearest 0.52-0.81); int8 joint 1.002-1.003,
round-to-nearest 1.002-1.008."""

import pytest
import torch

import endor
from endor.prune import CalibrationStats, prune_weight
from endor.prune import sparsegpt
from endor.prune.sparsegpt import JointGrid, act_order
from endor.format.equal import bit_equal
from tests.helpers import DTYPES
from tests.prune.inputs import correlated_inputs, random_weight


def stats_of(x):
    stats = CalibrationStats(x.shape[-1], hessian=True)
    stats.update(x)
    return stats


def output_error(weight, other, x) -> float:
    return float(((weight.double() - other.double()) @ x.double().T).square().sum())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("nm", [None, (2, 4)])
@pytest.mark.parametrize("group_size", [128, 32, 200])
def test_joint_beats_prune_then_round(bits, nm, group_size):
    weight = random_weight((64, 384), seed=1)
    x = correlated_inputs(2048, 384, seed=2)
    stats = stats_of(x)
    codec = f"int{bits}"
    joint, scales, rel = prune_weight(weight, method="sparsegpt", sparsity=0.5, nm=nm,
                                      stats=stats, quantize=(bits, group_size))
    et = endor.compress(joint, values=codec, group_size=group_size, scales=scales)
    assert bit_equal(endor.decompress(et), joint)  # already on the grid: stored exactly
    pruned = prune_weight(weight, method="sparsegpt", sparsity=0.5, nm=nm, stats=stats)
    rtn = endor.decompress(endor.compress(pruned, values=codec, group_size=group_size))
    errors = {"joint": output_error(weight, joint, x), "rtn": output_error(weight, rtn, x),
              "raw": output_error(weight, pruned, x)}
    # The mask of column-order SparseGPT, held fixed: every weight it prunes stays pruned.
    assert not bool(((pruned == 0) & (joint != 0)).any())
    if bits == 4:
        # int4 rounding errors are large: compensating them pays, less than with the mask
        # chosen in act-order on these synthetic layers (measured 0.52-0.81 of RTN's error,
        # 0.40-0.53 then); on the embedded models the fixed mask gave the better perplexity
        # (prune/sparsegpt.py says by how much).
        assert errors["joint"] < 0.85 * errors["rtn"], errors
    else:  # int8 rounding costs ~1% of the pruning error: joint stays that close to raw
        assert errors["joint"] < 1.02 * errors["raw"], errors
    assert 0 < rel < (0.02 if bits == 8 else 0.15)
    assert float((joint == 0).double().mean()) >= 0.5 - 1e-9


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_and_scales(dtype):
    weight = random_weight((16, 100), seed=3).to(dtype)
    stats = stats_of(correlated_inputs(300, 100, seed=4))
    joint, scales, _ = prune_weight(weight, method="sparsegpt", sparsity=0.5, stats=stats,
                                    quantize=(4, 64))
    assert joint.dtype == dtype and scales.dtype == dtype and scales.shape == (16, 2)
    et = endor.compress(joint, values="int4", group_size=64, scales=scales)
    assert bit_equal(endor.decompress(et), joint)


def test_joint_is_sparsegpt_only():
    weight = random_weight((8, 32), seed=5)
    with pytest.raises(ValueError, match="SparseGPT"):
        prune_weight(weight, method="magnitude", sparsity=0.5, quantize=(4, 128))


def test_act_order():
    h = torch.diag(torch.tensor([1.0, 5.0, 3.0, 3.0, 0.0, 9.0, 2.0, 4.0]))
    assert act_order(h).tolist() == [5, 1, 7, 2, 3, 6, 0, 4]  # decreasing, ties in column order


def test_joint_keeps_n_of_m_in_the_original_columns():
    weight = random_weight((32, 256), seed=6)
    stats = stats_of(correlated_inputs(1024, 256, seed=7))
    joint, _, _ = prune_weight(weight, method="sparsegpt", sparsity=0.5, nm=(2, 4),
                               stats=stats, quantize=(4, 64))
    assert int((joint.view(32, 64, 4) != 0).sum(-1).max()) <= 2


def test_grid_records_what_it_rounded_in_weight_column_order():
    weight = random_weight((8, 64), seed=3).float()
    columns = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    grid = JointGrid.from_weights(weight, 4, 16, torch.bfloat16, columns=columns)
    for position in range(64):  # the loop's positions: weight column columns[position]
        grid.round(position, weight[:, columns[position]])
    assert torch.equal(grid.seen, weight)


def test_refit_scales_fit_the_last_pass(monkeypatch):
    """The scales returned are those of the last pass, refit to what the pass before rounded:
    without a refit they differ."""
    weight = random_weight((32, 256), seed=4)
    stats = stats_of(correlated_inputs(1024, 256, seed=5))
    scales = {}
    for refits in (0, 1):
        monkeypatch.setattr(sparsegpt, "REFITS", refits)
        joint, scales[refits], _ = prune_weight(weight, method="sparsegpt", sparsity=0.5,
                                                stats=stats, quantize=(4, 64))
        et = endor.compress(joint, values="int4", group_size=64, scales=scales[refits])
        assert bit_equal(endor.decompress(et), joint)
    assert not torch.equal(scales[0], scales[1])
