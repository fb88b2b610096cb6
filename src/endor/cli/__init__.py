"""`endor` command line: parses arguments and calls the library, nothing else.

Each subcommand lives in its own module exposing `add_parser(subparsers)` and the handler it sets
with `set_defaults(run=...)`. The heavy libraries (transformers, accelerate, triton, matplotlib)
load on first use inside the library, so `endor --help` costs little more than `import torch`."""

import argparse
import importlib
import sys

from ..errors import FormatError

SUBCOMMANDS = ["bench", "convert", "eval", "generate", "inspect"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="endor", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"endor.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"endor.cli.{name}":
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed, for the records
    try:
        return args.run(args) or 0
    except (FormatError, FileNotFoundError, ValueError) as e:  # user errors: no traceback
        print(f"endor: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("endor: interrupted", file=sys.stderr)
        return 130
