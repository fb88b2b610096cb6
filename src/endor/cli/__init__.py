"""`endor` command line: parses arguments and calls the library, nothing else.

Each subcommand lives in its own module exposing `add_parser(subparsers)` and the handler it sets
with `set_defaults(run=...)`. The heavy libraries (transformers, accelerate, triton, matplotlib)
load on first use inside the library, so `endor --help` costs little more than `import torch`.

One error contract, kept here for every command (errors.py says what each exit code means): an
expected failure prints one line `endor <cmd>: error: ...` naming the path or option and exits
1; a usage error exits 2 (argparse); Ctrl-C exits 130 whenever it comes, imports included (the
console script enters through src/_endor_entry.py, whose handler is set before any endor import);
tracebacks only with --debug or ENDOR_DEBUG=1."""

import argparse
import importlib
import os
import signal
import sys

from ..errors import FormatError

SUBCOMMANDS = ["bench", "convert", "eval", "export", "generate", "inspect", "serve"]
EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 1, 2, 130, 141
DEBUG_HELP = "print the Python traceback of a failure (also: ENDOR_DEBUG=1)"


def _add_debug(parser: argparse.ArgumentParser) -> None:
    """--debug on `parser` and every subcommand under it, so it may come anywhere on the line."""
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=DEBUG_HELP)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):  # an alias maps to its parser
                _add_debug(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="endor", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"endor.cli.{name}").add_parser(sub)
    for child in sub.choices.values():
        _add_debug(child)
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    return parser


def describe_error(e: BaseException) -> str:
    """One line for an expected failure: the library's message (it names the file, tensor or
    option), or for an OS error its reason and path (no errno, no Python repr)."""
    if isinstance(e, OSError) and e.strerror:
        paths = [p for p in (e.filename, e.filename2) if p is not None]
        text = f"{e.strerror}: {' -> '.join(map(str, paths))}" if paths else e.strerror
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())  # one line, whatever the message held


def _expected(e: BaseException) -> bool:
    """Failures a user can meet and fix (bad input, full or read-only disk, missing file): one
    line, exit 1. Anything else is a bug: still one line without --debug, said so."""
    return isinstance(e, (FormatError, ValueError, OSError, ImportError))


def main(argv=None) -> int:
    as_program = argv is None  # run as `endor ...`, not called by Python code (tests)
    argv = list(sys.argv[1:] if argv is None else argv)
    # Named before parsing: a Ctrl-C may come while the parser's imports still run.
    prog = " ".join(["endor", *[a for a in argv if a in SUBCOMMANDS][:1]])
    debug = os.environ.get("ENDOR_DEBUG", "") not in ("", "0")
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv  # as typed, for the records
        prog = " ".join(["endor", args.command, *([args.benchmark]
                                                   if getattr(args, "benchmark", None) else [])])
        debug = debug or args.debug
        return args.run(args) or 0
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not interrupt this
        print(f"{prog}: interrupted", file=sys.stderr)
        if as_program:
            # The command's own cleanup (finally blocks) has run; what is left at interpreter
            # exit is joining I/O and loader threads an interrupt may have left mid-step, which
            # the user asked not to wait for.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `endor inspect ... | head`: the reader left; say nothing more
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so the interpreter's final flush is silent too
        return EXIT_BROKEN_PIPE
    except Exception as e:
        if debug:
            import traceback
            traceback.print_exc()
        elif _expected(e):
            print(f"{prog}: error: {describe_error(e)}", file=sys.stderr)
        else:
            print(f"{prog}: error: unexpected {type(e).__name__}: {describe_error(e)} (a bug: "
                  "rerun with --debug and report the traceback)", file=sys.stderr)
        return EXIT_FAILURE
