"""The one benchmark harness: warm-up, medians with min/max and n, synchronised timers, machine
info, cold-cache helpers, and the JSON envelope every benchmark writes (schema `endor-bench/1`)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch

from ..runtime.reader import evict_files, evict_page_cache  # noqa: F401  (re-exported)

SCHEMA = "endor-bench/1"


@dataclass(frozen=True)
class Stats:
    median_s: float
    min_s: float
    max_s: float
    n: int

    def gbps(self, nbytes: int) -> float:
        """Bandwidth at the median time, in GB/s (1e9 bytes)."""
        return nbytes / self.median_s / 1e9 if self.median_s > 0 else float("inf")

    def as_dict(self) -> dict:
        return asdict(self)


def synchronize(device=None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], object], *, warmup: int = 1, repeat: int = 5, device=None,
            setup: Callable[[], object] | None = None) -> Stats:
    """Time `fn` `repeat` times after `warmup` untimed calls. `setup` (e.g. evicting the page
    cache) runs before every call, outside the timed region."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    synchronize(device)
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return Stats(statistics.median(times), min(times), max(times), len(times))


def machine_info() -> dict:
    info = {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["ram_gb"] = round(psutil.virtual_memory().total / 1e9, 1)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = p.name
        info["gpu_memory_gb"] = round(p.total_memory / 1e9, 1)
        info["cuda"] = torch.version.cuda
    return info


def envelope(benchmark: str, params: dict, results: list[dict], **extra) -> dict:
    """The JSON document every benchmark writes."""
    return {
        "schema": SCHEMA,
        "benchmark": benchmark,
        "command": " ".join(["endor", *sys.argv[1:]]) if sys.argv[0].endswith("endor")
        else " ".join(sys.argv),  # the CLI puts the exact command here
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "load_avg_at_end": system_load(),  # how contended the machine was, for every benchmark
        "params": params,
        "results": results,
        **extra,
    }


def write_json(doc: dict, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def random_sparse(shape, dtype: torch.dtype, sparsity: float, *, seed: int = 0) -> torch.Tensor:
    """A random-normal tensor with exactly round(sparsity * numel) elements set to +0.0 at random
    positions and every other element non-zero, like a pruned weight. Exact counts make bits per
    element comparable with the (1-s)*b+1 bound."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=g).to(dtype).contiguous()
    flat = t.view(-1)
    # A normal sample can round to +-0.0 in a narrow dtype; it must stay a non-zero position.
    flat[flat == 0] = 1.0
    zeros = round(sparsity * flat.numel())
    if zeros:
        flat[torch.randperm(flat.numel(), generator=g)[:zeros]] = 0.0
    return t


def float_list(text: str) -> list[float]:
    """'0.5,0.6, 0.7' -> [0.5, 0.6, 0.7] (an argparse `type`; its ValueError becomes a usage
    error)."""
    return [float(x) for x in text.split(",") if x.strip()]


def int_list(text: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16] (an argparse `type`)."""
    return [int(x) for x in text.split(",") if x.strip()]


DTYPE_ALIASES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
                 "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def dtype_list(text: str) -> list[torch.dtype]:
    """'fp16,bf16' -> [torch.float16, torch.bfloat16] (an argparse `type`)."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [x for x in names if x not in DTYPE_ALIASES]
    if unknown:
        raise ValueError(f"unknown dtype(s) {unknown}; use {sorted(DTYPE_ALIASES)}")
    return [DTYPE_ALIASES[x] for x in names]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def system_load() -> float | None:
    """The 1-minute load average (None where the OS keeps none). On a shared machine it says how
    much the timings beside it were contended."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None
