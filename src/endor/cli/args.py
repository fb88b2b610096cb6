"""Argument types shared by the subcommands."""

import argparse


def at_least(minimum: int):
    """An argparse type: an integer >= minimum, with a clear message otherwise."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {number}")
        return number
    parse.__name__ = f"integer >= {minimum}"
    return parse


def non_empty(value: str) -> str:
    """An argparse type: any text but the empty string."""
    if not value:
        raise argparse.ArgumentTypeError("must not be empty")
    return value
