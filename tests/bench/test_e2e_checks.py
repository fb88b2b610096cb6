"""`endor bench e2e --checks` (src/endor/bench/e2e_checks.py): the systems it adds, the quick
document with both settings timed in the same rounds, and bad values."""

import pytest

from endor.bench import e2e, e2e_checks
from tests.bench.test_e2e import _args


def test_systems_get_an_unchecked_twin_each():
    assert e2e_checks.with_checks(["endor", "dense", "accelerate-cold"], (True, False)) == [
        "endor", "endor-unchecked", "dense", "dense-unchecked", "accelerate-cold"]
    assert e2e_checks.with_checks(["endor"], (False,)) == ["endor-unchecked"]
    assert e2e_checks.base_system("dense-unchecked") == ("dense", False)
    assert e2e_checks.base_system("endor") == ("endor", True)


@pytest.mark.parametrize("value", ["", "yes", "on,on", "on,off,maybe"])
def test_bad_checks_values_are_refused(value):
    with pytest.raises(ValueError, match="--checks"):
        e2e_checks.parse_checks(value)


def test_cost_is_the_paired_ratio():
    by = {"endor": {"s_per_token": 0.2}, "endor-unchecked": {"s_per_token": 0.19}}
    rounds = {"endor": [0.2, 0.21, 0.3], "endor-unchecked": [0.19, 0.2, 0.3]}
    ratios = e2e_checks.checks_ratios(by, rounds)
    assert ratios["endor_checks_cost"] == pytest.approx(1 - 0.2 / 0.21)
    assert e2e_checks.checks_met(ratios) == {"endor_checks_cost": True}


def test_quick_document_times_checks_on_and_off(tmp_path):
    doc = e2e.run(**_args("--workdir", str(tmp_path), "--systems", "endor,dense",
                          "--checks", "on,off", "--new-tokens", "3", "--values", "exp",
                          "--compute", "dense"))
    rows = {r["system"]: r for r in doc["results"]}
    endor = "endor-exp-dense"
    names = (endor, endor + "-unchecked", "dense", "dense-unchecked")
    assert set(names) <= set(rows)
    for name in names:
        assert rows[name]["tokens_match"], name
    # unchecked: the loader hashes nothing per token
    assert rows[endor]["verify_ms"] > 0 and rows[endor + "-unchecked"]["verify_ms"] == 0
    assert set(doc["ratios"]) >= {f"{endor}_checks_cost", "dense_checks_cost",
                                  f"{endor}_checked_vs_unchecked_paired"}
    assert set(doc["met"]) >= {f"{endor}_checks_cost", "dense_checks_cost"}
    assert doc["params"]["checks"] == "on,off"
    # the headline ratios use the checked rows
    assert doc["ratios"]["exp_best"] == endor
