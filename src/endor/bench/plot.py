"""Pictures and tables of benchmark documents (harness.envelope). `draw(name, doc, path)` picks the
benchmark's own plot, or a generic bar chart for a benchmark without one; `print_table(doc)`
prints any document's results. matplotlib is imported here, lazily, and only through its Agg
canvas: no pyplot state, no display needed."""

from __future__ import annotations

import importlib

import math
import sys
from collections.abc import Callable
from pathlib import Path


def _figure(ncols: int = 1, nrows: int = 1, *, width: float = 5.0, height: float = 3.6):
    # lazy: matplotlib is heavy; only drawing needs it
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _title(fig, doc: dict, what: str) -> None:
    machine = doc.get("machine", {})
    where = machine.get("gpu") or machine.get("cpu", "")
    fig.suptitle(f"endor bench {doc.get('benchmark', '?')}: {what}\n{where}", fontsize=10)


def _series(rows: list[dict], key: Callable[[dict], str]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(key(row), []).append(row)
    return out


# --- formats -------------------------------------------------------------------------------------

def _draw_formats(doc: dict):
    rows = doc["results"]
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    names = list(dict.fromkeys(r["format"] for r in rows))
    colors = {n: f"C{i % 10}" for i, n in enumerate(names)}
    fig, axes = _figure(len(dtypes), 2)
    for col, dtype in enumerate(dtypes):
        mine = [r for r in rows if r["dtype"] == dtype]
        bits_ax, speed_ax = axes[0][col], axes[1][col]
        # Zoom on the interesting range: a format far above dense bits is named, not drawn.
        top = 1.15 * max(r["bits_per_element"] for r in mine if r["format"] == "dense") \
            if any(r["format"] == "dense" for r in mine) else None
        off_chart = []
        for name, series in _series(mine, lambda r: r["format"]).items():
            xs = [r["sparsity"] for r in series]
            bits = [r["bits_per_element"] for r in series]
            style = dict(marker="o", color=colors[name], label=name,
                         linewidth=2.5 if name == "endor" else 1.2)
            speed_ax.plot(xs, [r["decode_gbps"] for r in series], **style)
            if name == "endor-reference":  # same bytes as "endor"
                continue
            if top is not None and min(bits) > top:
                off_chart.append(f"{name}: {min(bits):.3g}-{max(bits):.3g}")
                continue
            bits_ax.plot(xs, bits, **style)
        bound = sorted({(r["sparsity"], r["bits_bound"]) for r in mine})
        bits_ax.plot(*zip(*bound), "k--", linewidth=1, label="(1-s)b+1")
        if top is not None:
            bits_ax.set_ylim(0, top)
        if off_chart:
            bits_ax.text(0.02, 0.02, "off chart: " + "; ".join(off_chart),
                         transform=bits_ax.transAxes, fontsize=7)
        bits_ax.set(title=dtype, xlabel="sparsity", ylabel="bits / element")
        speed_ax.set(title=dtype, xlabel="sparsity", ylabel="decompress GB/s (dense bytes)",
                     yscale="log")
        for ax in (bits_ax, speed_ax):
            ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower left", bbox_to_anchor=(1.0, 0.0))
    axes[1][-1].legend(fontsize=7, loc="lower left", bbox_to_anchor=(1.0, 0.0))
    _title(fig, doc, "size and decompression speed per format")
    return fig


# --- decompress --------------------------------------------------------------------------------

def _bars(ax, rows: list[dict], group: Callable[[dict], str], series: Callable[[dict], str],
          value: str) -> None:
    groups = list(dict.fromkeys(group(r) for r in rows))
    by_series = _series(rows, series)
    width = 0.8 / max(1, len(by_series))
    for i, (name, srows) in enumerate(by_series.items()):
        values = {group(r): r[value] for r in srows}
        xs = [g + i * width for g in range(len(groups)) if groups[g] in values]
        ax.bar(xs, [values[g] for g in groups if g in values], width, label=name)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups, fontsize=7)
    ax.grid(alpha=0.3, axis="y")


def _draw_decompress(doc: dict):
    rows = doc["results"]
    devices = list(dict.fromkeys(r["device"] for r in rows))
    fig, axes = _figure(len(devices), width=9.0)
    for col, device in enumerate(devices):
        ax = axes[0][col]
        mine = [r for r in rows if r["device"] == device]
        _bars(ax, mine, lambda r: f"{r['dtype']}\ns={r['sparsity']:g}"
              + (f"\n{r['values']}" if r.get("values", "raw") != "raw" else ""),
              lambda r: r["method"] + (" out=" if r["output"] == "out" else ""), "gbps")
        ax.set(title=device, ylabel="GB/s (dense bytes produced)", yscale="log")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _title(fig, doc, "decompress vs copy and numpy")
    return fig


# --- transfer ------------------------------------------------------------------------------------

def _draw_transfer(doc: dict):
    rows = doc["results"]
    disk = [r for r in rows if r["link"] == "disk"]
    h2d = [r for r in rows if r["link"] == "host_device"]
    memcpy = [r for r in rows if r["link"] == "host_memcpy"]
    fig, axes = _figure(2 if h2d else 1, width=6.0)
    ax = axes[0][0]
    if disk:
        _bars(ax, disk, lambda r: f"{r['block_mib']} MiB blocks", lambda r: r["mode"], "gbps")
    for r, style in zip(memcpy, ("--", ":", "-.")):
        ax.axhline(r["gbps"], linestyle=style, linewidth=1, color="gray",
                   label=f"memcpy, {r['threads']} thread(s): {r['gbps']:.1f} GB/s")
    ax.set(title="disk reads vs host memcpy", ylabel="GB/s")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if h2d:
        ax = axes[0][1]
        for name, series in _series(h2d, lambda r: f"{r['direction']} {r['memory']}").items():
            ax.plot([r["size_mib"] for r in series], [r["gbps"] for r in series], marker="o",
                    label=name)
        ax.set(title="host <-> device copies", xlabel="MiB", ylabel="GB/s", xscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _title(fig, doc, "link limits")
    return fig


# --- convert -------------------------------------------------------------------------------------

def _draw_convert_scale(doc: dict):
    rows = doc["results"]
    fig, axes = _figure(2, width=5.5)
    speed, memory = axes[0]
    labels = [f"{r['case']}: {r['method']} ({r['device']})" for r in rows]
    speed.barh(range(len(rows)), [r["s_per_b_params"] for r in rows], color="C0")
    for i, r in enumerate(rows):
        speed.text(r["s_per_b_params"], i, f" {r['s_per_b_params']:.3g} s/B, {r['seconds']:.0f} s",
                   va="center", fontsize=7)
    speed.set_yticks(range(len(rows)), labels, fontsize=7)
    speed.invert_yaxis()
    speed.set(title="conversion time", xlabel="seconds per billion parameters")
    speed.margins(x=0.45)
    speed.grid(alpha=0.3, axis="x")
    memory.barh(range(len(rows)), [r["peak_rss_gb"] for r in rows], color="C1",
                label="peak RSS")
    gpu = [r.get("peak_gpu_gb") for r in rows]
    if any(g is not None for g in gpu):
        memory.scatter([g or 0 for g in gpu], range(len(rows)), color="k", marker="|", s=200,
                       zorder=3, label="peak GPU memory")
    memory.set_yticks(range(len(rows)), labels, fontsize=7)
    memory.invert_yaxis()
    memory.set(title="peak memory", xlabel="GB")
    memory.grid(alpha=0.3, axis="x")
    memory.legend(fontsize=7)
    _title(fig, doc, "seconds per billion parameters and peak memory per method")
    return fig


def _draw_convert(doc: dict):
    if doc.get("params", {}).get("mode") == "scale":
        return _draw_convert_scale(doc)
    rows = doc["results"]
    timed = [r for r in rows if isinstance(r.get("gbps"), (int, float))]
    measured = [r for r in rows if isinstance(r.get("peak_rss_gb"), (int, float))]
    fig, axes = _figure(2, width=5.5)
    speed, memory = axes[0]
    speed.barh(range(len(timed)), [r["gbps"] for r in timed], color="C0")
    speed.set_yticks(range(len(timed)), [r["case"] for r in timed], fontsize=7)
    for i, r in enumerate(timed):
        speed.text(r["gbps"], i, f" {r['gbps']:.3g} GB/s, {r['seconds']:.1f} s", va="center",
                   fontsize=7)
    speed.invert_yaxis()
    speed.set(title=f"throughput ({timed[0]['source_gb']:g} GB source)" if timed else
              "throughput", xlabel="GB/s of source")
    speed.margins(x=0.45)
    speed.grid(alpha=0.3, axis="x")
    labels = [r["case"] for r in measured]
    anon = [r.get("peak_rss_anon_gb") or 0.0 for r in measured]
    file_backed = [r.get("peak_rss_file_gb") or 0.0 for r in measured]
    memory.barh(range(len(measured)), anon, color="C1", label="anonymous (at its peak)")
    memory.barh(range(len(measured)), file_backed, left=anon, color="C2",
                label="file-backed (at its peak)")
    memory.scatter([r["peak_rss_gb"] for r in measured], range(len(measured)), color="k",
                   marker="|", s=200, zorder=3, label="peak RSS (getrusage)")
    limit = doc.get("done_when", {}).get("peak_rss_gb_max")
    if limit is not None:
        memory.axvline(limit, color="red", linestyle="--", linewidth=1,
                       label=f"budget {limit:g} GB")
    memory.set_yticks(range(len(measured)), labels, fontsize=7)
    memory.invert_yaxis()
    memory.set(title="peak memory", xlabel="GB")
    memory.grid(alpha=0.3, axis="x")
    memory.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
    _title(fig, doc, "conversion throughput and peak memory")
    return fig


# --- any other benchmark -------------------------------------------------------------------------

def _scalar_columns(rows: list[dict]) -> list[str]:
    cols: dict[str, None] = {}
    for row in rows:
        for k, v in row.items():
            if v is None or isinstance(v, (str, int, float, bool)):
                cols.setdefault(k)
    return list(cols)


def headline_metric(rows: list[dict], columns: list[str] | None = None) -> str | None:
    """The column a generic chart shows: a throughput if there is one, else the first number,
    looking at the benchmark's table columns first."""
    order = [*(columns or []), *_scalar_columns(rows)]
    numeric = [c for c in dict.fromkeys(order)
               if any(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool)
                      for r in rows)]
    for hint in ("tokens_per_s", "per_s", "gbps"):
        for c in numeric:
            if hint in c:
                return c
    return numeric[0] if numeric else None


# Numeric columns that name a case rather than measure it.
_LABEL_NUMBERS = ("sparsity", "block_mib", "size_mib", "threads", "batch_size", "prompt_len")


def _label(row: dict, metric: str) -> str:
    parts = [v if isinstance(v, str) else f"{k}={v:g}" for k, v in row.items()
             if k != metric and (isinstance(v, str)
                                 or (k in _LABEL_NUMBERS and isinstance(v, (int, float))))]
    return " ".join(parts) or "?"


def _draw_generic(doc: dict):
    rows = [r for r in doc.get("results", []) if isinstance(r, dict)]
    metric = headline_metric(rows, doc.get("table_columns"))
    fig, axes = _figure(width=7.0, height=max(2.0, 0.3 * len(rows) + 1.0))
    ax = axes[0][0]
    if metric is None:
        ax.text(0.5, 0.5, "no numeric results", ha="center", va="center")
    else:
        shown = [r for r in rows if isinstance(r.get(metric), (int, float))]
        ax.barh(range(len(shown)), [r[metric] for r in shown])
        ax.set_yticks(range(len(shown)), [_label(r, metric) for r in shown], fontsize=7)
        ax.invert_yaxis()
        ax.set(xlabel=metric)
        ax.grid(alpha=0.3, axis="x")
    _title(fig, doc, metric or "results")
    return fig


# --- e2e -----------------------------------------------------------------------------------------

E2E_STAGES = ("read", "verify", "transfer", "decompress", "compute", "stall")


def _e2e_color(system: str, k: int = 0):
    if system == "dense":
        return "C0"
    if system.startswith("ideal"):
        return "0.75"
    if system.startswith(("endor", "ram-endor")):
        return f"C{2 + k % 8}" if k else "C2"
    return "C1"  # Accelerate, ram-dense


def _draw_batch_curve(ax, rows: list[dict]) -> None:
    """Tokens/s (every prompt counted) against the batch size, one line per system."""
    systems = list(dict.fromkeys(r["system"] for r in rows if "batch" in r and
                                 r.get("decode_tokens_per_s")))
    for k, system in enumerate(systems):
        points = sorted((r["batch"], r["decode_tokens_per_s"]) for r in rows
                        if r["system"] == system and "batch" in r)
        ax.plot(*zip(*points), marker="o", label=system, color=_e2e_color(system, k))
    ax.set(xscale="log", yscale="log", xlabel="batch (prompts per step)",
           ylabel="decode tokens/s", title="batch curve")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)


def _draw_e2e(doc: dict):
    """e2e: decode tokens/s per system (Endor, dense, Accelerate, ideal), and per-stage busy time
    per token of our two pipelines (stages overlap: bars add up to more than the wall time when
    prefetch works; stall is what it did not hide)."""
    rows = [r for r in doc.get("results", []) if isinstance(r, dict) and "system" in r]
    if not rows:
        return _draw_generic(doc)
    batches = sorted({r["batch"] for r in rows if "batch" in r})
    fig, axes = _figure(3 if len(batches) > 1 else 2, width=5.5)
    speed_ax, stage_ax = axes[0][:2]
    if len(batches) > 1:
        _draw_batch_curve(axes[0][2], rows)
    first = batches[0] if batches else None
    rows = [r for r in rows if r.get("batch", first) == first]  # batch curves: the first size
    shown = [r for r in rows if r.get("decode_tokens_per_s")]
    bars = speed_ax.bar(range(len(shown)), [r["decode_tokens_per_s"] for r in shown],
                        color=[_e2e_color(r["system"]) for r in shown])
    speed_ax.bar_label(bars, fmt="%.3g", fontsize=6)
    speed_ax.set_xticks(range(len(shown)), [r["system"] for r in shown], rotation=35,
                        ha="right", fontsize=6)
    speed_ax.set(ylabel="decode tokens/s (median)", title="throughput")
    speed_ax.grid(alpha=0.3, axis="y")
    ours = [r for r in rows if r["system"] == "dense" or r["system"].startswith("endor")]
    stages = [s for s in E2E_STAGES if any(r.get(f"{s}_ms") for r in ours)]
    width = 0.8 / max(len(ours), 1)
    for k, r in enumerate(ours):
        xs = [i + (k - (len(ours) - 1) / 2) * width for i in range(len(stages))]
        color = _e2e_color(r["system"], k)
        stage_ax.bar(xs, [r.get(f"{s}_ms", 0.0) for s in stages], width, label=r["system"],
                     color=color)
        stage_ax.axhline(r["s_per_token"] * 1e3, color=color, linestyle="--", linewidth=1)
    stage_ax.set_xticks(range(len(stages)), stages, fontsize=8)
    stage_ax.set(ylabel="busy ms per token (dashed: wall)", title="pipeline stages")
    stage_ax.grid(alpha=0.3, axis="y")
    if ours:
        stage_ax.legend(fontsize=6)
    params = doc.get("params", {})
    _title(fig, doc, f"{params.get('device', 'cpu')} compute, {params.get('offload', 'disk')} "
           f"offload, {params.get('model_bytes', 0) / 1e9:.2f} GB {params.get('dtype', '')}")
    return fig


DRAWERS: dict[str, Callable[[dict], object]] = {
    "formats": lambda doc: importlib.import_module("endor.bench.formats_models").draw(doc)
    if doc.get("params", {}).get("source") == "models" else _draw_formats(doc),
    "decompress": _draw_decompress, "transfer": _draw_transfer,
    "convert": _draw_convert,
    # Benchmarks that draw their own figure, imported only when drawn.
    "quality": lambda doc: importlib.import_module("endor.bench.quality").draw(doc),
    "e2e": _draw_e2e,
    "gemv": lambda doc: importlib.import_module("endor.bench.gemv").draw(doc),
}


def draw(name: str, doc: dict, path) -> Path:
    """Write the PNG of benchmark `name`'s document to `path`."""
    fig = DRAWERS.get(name, _draw_generic)(doc)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3) or math.isinf(value):
            return f"{value:.3g}"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def format_table(doc: dict) -> str:
    """The results as an aligned text table: `doc["table_columns"]` if the benchmark chose its
    columns, else every scalar column."""
    rows = [r for r in doc.get("results", []) if isinstance(r, dict)]
    if not rows:
        return f"{doc.get('benchmark', '?')}: no results"
    columns = doc.get("table_columns") or _scalar_columns(rows)
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def print_table(doc: dict, file=None) -> None:
    print(format_table(doc), file=file or sys.stdout)
