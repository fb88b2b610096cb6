"""`endor bench <name>`: run one benchmark (module endor.bench.<name>), write <out>/<name>.json
and <out>/<name>.png, print a table."""

import importlib
import pkgutil
import shlex
from pathlib import Path

from .. import bench
from ..bench import harness, plot
from .args import at_least

# Listed first, in this order; any other module of endor.bench exposing add_arguments() and
# run() is a benchmark too, listed after them by name.
BENCHMARKS = ("formats", "decompress", "transfer", "e2e", "convert")
# Former names still accepted on the command line (results are written under the new name).
ALIASES = {"decompress": ["decode"]}
DEFAULT_OUT = "bench-results"
# Namespace entries that belong to the command line, not to a benchmark's run().
CLI_KEYS = frozenset({"command", "benchmark", "run", "argv", "out", "debug"})


def benchmark_names() -> list[str]:
    found = {m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_")}
    return [*BENCHMARKS, *sorted(found - set(BENCHMARKS))]


def _module(name: str):
    """The benchmark's module, or None when the module is a helper (harness, plot...), not a
    benchmark."""
    module = importlib.import_module(f"endor.bench.{name}")
    return module if hasattr(module, "add_arguments") and hasattr(module, "run") else None


def _add_common(parser) -> None:
    common = parser.add_argument_group("common benchmark options")
    common.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"directory for <name>.json and <name>.png (default {DEFAULT_OUT}/; "
                             "committed results live in docs/benchmarks)")
    common.add_argument("--quick", action="store_true",
                        help="small sizes, for tests and CI (seconds, not minutes)")
    common.add_argument("--repeat", type=at_least(1), default=None,
                        help="timed runs per case; the median is reported (default 5, "
                             "--quick 2)")
    common.add_argument("--warmup", type=at_least(0), default=1,
                        help="untimed runs before timing (default 1)")


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="run a benchmark; writes JSON + PNG",
                                   description=__doc__)
    benchmarks = parser.add_subparsers(dest="benchmark", required=True, metavar="NAME")
    for name in benchmark_names():
        module = _module(name)
        if module is None:
            continue
        doc = (module.__doc__ or "").strip()
        sub = benchmarks.add_parser(name, aliases=ALIASES.get(name, []),
                                    help=doc.splitlines()[0] if doc else None,
                                    description=doc or None)
        _add_common(sub)
        module.add_arguments(sub)
        sub.set_defaults(run=run, benchmark=name)  # the name, even when called by an alias


def benchmark_params(args) -> dict:
    """The keyword arguments of the benchmark's run(): its options as parsed, with the default
    --repeat resolved."""
    params = {k: v for k, v in vars(args).items() if k not in CLI_KEYS}
    if params["repeat"] is None:
        params["repeat"] = 2 if params["quick"] else 5
    return params


def run(args) -> int:
    name = args.benchmark
    doc = _module(name).run(**benchmark_params(args))
    if getattr(args, "argv", None) is not None:
        doc["command"] = shlex.join(["endor", *args.argv])  # the command that reruns it
    out = Path(args.out)
    json_path = harness.write_json(doc, out / f"{name}.json")
    png_path = plot.draw(name, doc, out / f"{name}.png")
    plot.print_table(doc)
    load = doc.get("params", {}).get("load_avg")
    if load:  # timings on a shared machine mean little without it
        print(f"\nload average (1 min): {load.get('before')} before, {load.get('after')} after, "
              f"on {doc.get('machine', {}).get('cpu_count')} CPUs")
    print(f"\nwrote {json_path} and {png_path}")
    return 0
