"""N:M semi-structured sparsity: at most N non-zeros in every M consecutive input weights of a
row ("2:4" keeps 2 of every 4, 50% sparsity). Argument checking and parsing live here."""

from __future__ import annotations


def check_nm(nm) -> tuple[int, int]:
    """Validate an (N, M) pair and return it as a tuple of ints. 1 <= N <= M."""
    if isinstance(nm, str):
        raise TypeError(f"nm must be a pair of ints such as (2, 4), got the string {nm!r}; "
                        "use endor.prune.parse_nm to read '2:4'")
    try:
        keep, group = nm
    except (TypeError, ValueError):
        raise ValueError(f"nm must be a pair (N, M) such as (2, 4), got {nm!r}") from None
    for name, value in (("N", keep), ("M", group)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"nm {name} must be an int, got {value!r} in nm={nm!r}")
    if not 1 <= keep <= group:
        raise ValueError(f"nm=({keep}, {group}) is malformed: N non-zeros are kept in every M "
                         "weights, so 1 <= N <= M is required (2:4 is (2, 4))")
    return keep, group


def parse_nm(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4), for command lines and config files."""
    parts = str(text).split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"N:M sparsity must be written like '2:4', got {text!r}")
    return check_nm((int(parts[0]), int(parts[1])))


def nm_sparsity(nm: tuple[int, int]) -> float:
    """The fraction of zeros an N:M pattern gives: 1 - N/M."""
    keep, group = nm
    return 1 - keep / group


def check_divisible(in_features: int, nm: tuple[int, int]) -> None:
    if in_features % nm[1]:
        raise ValueError(f"N:M sparsity {nm[0]}:{nm[1]} needs in_features to be a multiple of "
                         f"{nm[1]}, but the weight has {in_features} input features")
