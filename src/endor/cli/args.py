"""Argument types shared by the subcommands."""

import argparse

from ..runtime.plan import parse_size


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


def memory_size(value: str) -> int:
    """An argparse type: a memory budget as --max-memory takes it (500MB, 2GiB, 0, 1000000), so
    a malformed one is a usage error (exit 2) naming the option, not a failure after loading."""
    try:
        return parse_size(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


MEMORY_HELP = ("bytes for resident weights, e.g. 500MB or 2GiB; 0 streams every decoder layer "
               "(default: no limit, nothing streams)")


def add_placement(parser) -> None:
    """Where a loaded model computes and keeps its weights: --device, --offload, --max-memory
    (the commands that load a checkpoint for offloaded inference: generate, serve)."""
    parser.add_argument("--device", default="cpu",
                        help="where it computes: cpu or cuda (default cpu)")
    parser.add_argument("--offload", choices=("disk", "cpu"), default="disk",
                        help="where streamed layers live: disk (O_DIRECT reads) or cpu "
                             "(compressed, in RAM) (default disk)")
    parser.add_argument("--max-memory", type=memory_size, default=None, metavar="SIZE",
                        help=MEMORY_HELP)
