"""The `endor` console script's entry point, outside the endor package on purpose: importing
any module of the package runs endor/__init__.py first, and those imports (and the CLI's:
argparse, enum, re) take tens of milliseconds during which a Ctrl-C would end in Python's
KeyboardInterrupt traceback. Here the first lines make Ctrl-C exit 130 with one line; once the
CLI is imported, Python's own handler is back and endor.cli.main's contract takes over (its
finally blocks run, then exit 130)."""

import os  # already loaded by Python's startup (site)
import sys

# The C module under `signal`: importing `signal` itself first imports enum (~10 ms).
import _signal

EXIT_INTERRUPTED = 130  # as endor.cli's; this module imports nothing of endor before its handler


def _interrupted_while_starting(signum, frame):
    # Nothing has started that needs cleaning up: say so and leave now.
    os.write(2, b"endor: interrupted\n")
    os._exit(EXIT_INTERRUPTED)


def main() -> int:
    from endor.cli import main as cli_main  # under the handler installed below

    _signal.signal(_signal.SIGINT, _signal.default_int_handler)
    return cli_main()


_signal.signal(_signal.SIGINT, _interrupted_while_starting)

if __name__ == "__main__":
    sys.exit(main())
