import pytest

from endor.prune.nm import check_divisible, check_nm, nm_sparsity, parse_nm


@pytest.mark.parametrize("nm", [(2, 4), [2, 4], (1, 4), (4, 8), (4, 4)])
def test_valid(nm):
    assert check_nm(nm) == tuple(nm)


@pytest.mark.parametrize("nm", [(0, 4), (5, 4), (2,), (2, 4, 8), (2.0, 4), (True, 4), (2, None),
                                3, (-1, 4)])
def test_malformed(nm):
    with pytest.raises(ValueError, match="nm"):
        check_nm(nm)


def test_string_is_refused_with_a_hint():
    with pytest.raises(TypeError, match="parse_nm"):
        check_nm("2:4")


def test_parse():
    assert parse_nm("2:4") == (2, 4)
    assert parse_nm(" 4:8") == (4, 8)
    for text in ("2/4", "2:", "a:b", "2:4:8", "-1:4", "5:4"):
        with pytest.raises(ValueError):
            parse_nm(text)


def test_sparsity_and_divisibility():
    assert nm_sparsity((2, 4)) == 0.5
    assert nm_sparsity((1, 4)) == 0.75
    check_divisible(128, (2, 4))
    with pytest.raises(ValueError, match="multiple of 4"):
        check_divisible(130, (2, 4))
