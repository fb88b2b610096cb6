"""The checkpoints of `endor bench e2e`: a synthetic HF model, pruned by magnitude and converted
to dense weights and to Endor weights once per value codec (cached by shape)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock

from ..convert import convert
from ..convert.pipeline import DEFAULT_VALUES
from ..convert.synthetic import write_synthetic_checkpoint


def synthetic_source(config, opts, workdir: Path, family: str) -> tuple[Path, Path]:
    """The cache folder of one model shape, dtype and sparsity (`workdir/<family>-<key>`) and
    its random-weight HF checkpoint inside, written on first use."""
    key = hashlib.sha256(json.dumps([config.to_dict(), opts.dtype, opts.sparsity],
                                    sort_keys=True, default=str).encode()).hexdigest()[:12]
    root = workdir / f"{family}-{key}"
    hf = root / "hf"
    with cache_lock(root):
        if not (hf / "config.json").is_file():
            write_synthetic_checkpoint(hf, config, dtype=getattr(torch, opts.dtype))
    return root, hf


@contextmanager
def cache_lock(root: Path):
    """Held while a cache folder's checkpoints are checked and written: two benchmarks given
    the same --workdir would otherwise convert into the same folder at once, or one would load
    a checkpoint the other is still writing. (Not re-entrant: take it once at a time.)"""
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(root / ".lock"):
        yield


def prepare(config, opts, workdir: Path, values: list[str]) -> dict:
    """Synthetic HF checkpoint -> converted "dense" and one "endor-<codec>" checkpoint per value
    codec (cached by shape)."""
    root, hf = synthetic_source(config, opts, workdir, "llama")
    out = {"dense": (root / "dense", "dense", "raw")}
    out.update({v: (root / f"endor-{v}", "endor", v) for v in values})
    with cache_lock(root):
        convert_all(hf, {k: o for k, o in out.items() if not (o[0] / "endor.json").is_file()},
                    opts.sparsity)
    return {k: o[0] for k, o in out.items()}


_CONVERT_CHILD = ("import sys; from endor.convert import convert; convert(sys.argv[1], "
                  "sys.argv[2], method='magnitude', sparsity=float(sys.argv[3]), "
                  "weights=sys.argv[4], values=sys.argv[5], progress=False)")


def convert_all(hf: Path, outs: dict, sparsity: float, *, parallel: bool | None = None) -> None:
    """Prune and convert `hf` to each {name: (out dir, weights, values)} (or {weights: out dir},
    values the default codec). convert runs on one thread, so on a machine with cores to spare (default: 8 or more; the GPU host) the
    conversions run at once, in child processes: the device check's first run builds its
    checkpoints in half the time."""
    if parallel is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
        parallel = cores >= 8
    outs = {k: o if isinstance(o, tuple) else (o, k, DEFAULT_VALUES) for k, o in outs.items()}
    if not parallel or len(outs) < 2:
        for out, weights, values in outs.values():
            convert(hf, out, method="magnitude", sparsity=sparsity, weights=weights,
                    values=values, progress=False)
        return

    env = dict(os.environ)  # the children import this very endor, installed or not
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[2]),
                                                      env.get("PYTHONPATH")]))
    children = [subprocess.Popen([sys.executable, "-c", _CONVERT_CHILD, str(hf), str(out),
                                  repr(float(sparsity)), weights, values], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                for out, weights, values in outs.values()]
    errors = []
    try:
        for child, name in zip(children, outs):
            _, err = child.communicate()
            if child.returncode:
                errors.append(f"converting to {name} weights failed "
                              f"(exit {child.returncode}):\n{err[-3000:]}")
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    if errors:
        raise RuntimeError("\n".join(errors))
