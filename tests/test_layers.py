"""Imports run one way (docs/ARCHITECTURE.md): every import of every module under src/endor,
function-local ones included, read with `ast` (nothing is imported), checked against the layers.

A module may import its own package and the packages of lower layers, never a higher layer and
never another package of its own layer; then no cycle between packages can exist either (checked
on its own below, so a wrong table cannot hide one)."""

import ast
from pathlib import Path

import pytest

import endor

SRC = Path(endor.__file__).parent

# Lowest first. A package (or top-level module) may import only those on lower lines.
LAYERS = [
    ["errors", "data"],           # typed user errors; embedded models and texts (no endor import)
    ["format"],                   # the file format and the decompressor contract
    ["kernels", "checkpoint", "prune", "moe"],  # fast decompressors; checkpoint directories;
    # pruning maths; mixture-of-experts naming (per-expert checkpoint tensors <-> fused parameters)
    ["convert", "runtime", "reference_loader", "inspect"],  # write; run; in-memory reference; list
    ["evaluate", "integrations"],  # perplexity; from_pretrained, serve, export, Hub ids
    ["bench"],                    # benchmarks and the Accelerate baseline
    ["demo"],                     # `make demo`
    ["cli"],                      # argument parsing only
    ["__init__", "__main__"],     # `endor` itself: the public names
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def unit(module: str) -> str:
    """The layer unit of `endor.a.b`: `a`; the package `endor` itself is `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The endor modules an import statement inside `module` loads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "endor"]
    if node.level:
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
        base = f"{base}.{node.module}" if node.module else base
    else:
        base = node.module or ""
    if base.split(".")[0] != "endor":
        return []
    # `from pkg import name` loads pkg.name when that is a module (e.g. `from .. import bench`).
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def imports_of(module: str, source: str) -> list[tuple[str, str, int]]:
    """(module, imported endor module, line) for every import statement of `source`, nested ones
    (inside functions, try blocks, ...) included."""
    return [(module, target, node.lineno) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.Import, ast.ImportFrom)) for target in resolve(module, node)]


IMPORTS = [edge for module, path in MODULES.items() for edge in imports_of(module, path.read_text())]


def test_the_walk_sees_the_imports_it_must():
    # Guards the walker itself: absolute, relative, `from pkg import module`, function-local.
    source = ("import endor.format\nfrom ..errors import FormatError\nfrom .. import bench\n"
              "def f():\n    if True:\n        from ..runtime.model import load_model\n")
    assert [b for _, b, _ in imports_of("endor.cli.convert", source)] == [
        "endor.format", "endor.errors", "endor.bench", "endor.runtime.model"]
    edges = {(a, b) for a, b, _ in IMPORTS}
    assert ("endor.kernels.cpu", "endor.format.decompress") in edges
    assert ("endor.cli.bench", "endor.bench") in edges
    assert len(MODULES) > 50 and len(IMPORTS) > 150


def test_every_package_has_a_layer():
    assert {unit(m) for m in MODULES} == set(RANK)


def test_no_upward_or_sideways_import():
    bad = [f"{MODULES[a].relative_to(SRC.parent)}:{line}: {a} imports {b} "
           f"(layer {RANK[unit(a)]} -> {RANK[unit(b)]})"
           for a, b, line in IMPORTS if unit(a) != unit(b) and RANK[unit(b)] >= RANK[unit(a)]]
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_packages():
    graph: dict[str, set[str]] = {}
    for a, b, _ in IMPORTS:
        if unit(a) != unit(b):
            graph.setdefault(unit(a), set()).add(unit(b))
    done, on_path = set(), []

    def visit(node):
        if node in on_path:
            pytest.fail("import cycle: " + " -> ".join(on_path[on_path.index(node):] + [node]))
        if node in done:
            return
        on_path.append(node)
        for nxt in sorted(graph.get(node, ())):
            visit(nxt)
        on_path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
