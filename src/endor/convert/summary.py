"""The conversion summary, computed from the shards on disk alone (their headers and the small
`endor.convert` metadata entry each shard carries), so a resumed conversion reports the same
numbers as an uninterrupted one: sparsity per layer type and per layer, dense vs stored bytes."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..format import EndorFile

SHARD_META_KEY = "endor.convert"


def shard_metadata(settings: dict, nnz: dict) -> dict:
    """The metadata of one shard: the conversion settings (checked on resume) and the number of
    non-zeros of every decoder Linear weight it holds (dense ones included)."""
    return {"format": "pt",  # what transformers' save_pretrained writes; some readers check it
            SHARD_META_KEY: json.dumps({"settings": settings, "nnz": nnz}, sort_keys=True)}


def read_shard_metadata(f: EndorFile):
    """(settings, nnz) stored in a shard, or None when it was not written by `endor convert`."""
    raw = f.metadata().get(SHARD_META_KEY)
    if raw is None:
        return None
    try:
        body = json.loads(raw)
        return body["settings"], body["nnz"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def _add(row: dict, numel: int, nnz: int, dense: int, stored: int) -> None:
    row["tensors"] = row.get("tensors", 0) + 1
    row["numel"] = row.get("numel", 0) + numel
    row["nnz"] = row.get("nnz", 0) + nnz
    row["dense_bytes"] = row.get("dense_bytes", 0) + dense
    row["stored_bytes"] = row.get("stored_bytes", 0) + stored


def _finish(row: dict) -> dict:
    row["sparsity"] = round(1 - row["nnz"] / row["numel"], 6) if row.get("numel") else 0.0
    return row


def summarize(out_dir, shard_files: list[str], layer_type, layer_of) -> dict:
    """Sparsity per decoder-Linear type (`self_attn.q_proj`, ...) and per layer, and bytes.
    `layer_type(name)` / `layer_of(name)` come from the model's ModelLayout."""
    by_type: dict[str, dict] = {}
    by_layer: dict[int, dict] = {}
    linear, total = {}, {"dense_bytes": 0, "stored_bytes": 0, "tensors": 0}
    for file in shard_files:
        path = Path(out_dir) / file
        total["stored_bytes"] += path.stat().st_size
        with EndorFile(path) as f:
            meta = read_shard_metadata(f)
            nnz_of = meta[1] if meta else {}
            for name in f.keys():
                if f.is_compressed(name):
                    shape, dtype, nnz, _ = f.entry(name)
                    numel = math.prod(shape)
                    dense = numel * dtype.itemsize
                    stored = sum(end - start for start, end in f.byte_ranges(name))
                else:
                    st = f.header.tensors[name]
                    numel = math.prod(st.shape)
                    dense = stored = st.end - st.start
                    nnz = nnz_of.get(name)
                total["dense_bytes"] += dense
                total["tensors"] += 1
                if name in nnz_of:
                    for row in (by_type.setdefault(layer_type(name), {}),
                                by_layer.setdefault(layer_of(name), {}), linear):
                        _add(row, numel, nnz, dense, stored)
    total["ratio"] = round(total["dense_bytes"] / total["stored_bytes"], 4) \
        if total["stored_bytes"] else 0.0
    return {"by_type": {k: _finish(v) for k, v in sorted(by_type.items())},
            "by_layer": [_finish(by_layer[i])["sparsity"] for i in sorted(by_layer)],
            "decoder_linear": _finish(linear) if linear else {},
            "total": total}


def format_summary(summary: dict, target_sparsity: float | None = None) -> str:
    """A table for people: one row per layer type, then totals; with `target_sparsity` (the
    fraction pruning aimed at, None for method "none") a line saying where zeros beyond it, or
    any zeros at all without pruning, came from."""
    lines = [f"{'layer type':<28} {'tensors':>7} {'sparsity':>9} {'dense MB':>10} "
             f"{'stored MB':>10} {'ratio':>6}"]
    rows = list(summary["by_type"].items())
    if summary.get("decoder_linear"):
        rows.append(("all decoder Linear", summary["decoder_linear"]))
    for name, r in rows:
        ratio = r["dense_bytes"] / r["stored_bytes"] if r["stored_bytes"] else 0.0
        lines.append(f"{name:<28} {r['tensors']:>7} {r['sparsity']:>9.4f} "
                     f"{r['dense_bytes'] / 1e6:>10.1f} {r['stored_bytes'] / 1e6:>10.1f} "
                     f"{ratio:>5.2f}x")
    t = summary["total"]
    lines.append(f"{'checkpoint (all tensors)':<28} {t['tensors']:>7} {'':>9} "
                 f"{t['dense_bytes'] / 1e6:>10.1f} {t['stored_bytes'] / 1e6:>10.1f} "
                 f"{t['ratio']:>5.2f}x")
    got = summary.get("decoder_linear", {}).get("sparsity")
    if got is not None and target_sparsity is None and got > 0:
        lines.append(f"(no pruning: the decoder Linear sparsity {got:.4f} is the source's own "
                     "zeros)")
    elif got is not None and target_sparsity is not None and got > target_sparsity + 5e-4:
        lines.append(f"(sparsity {got:.4f} > the {target_sparsity:.4f} pruned: the source "
                     "already held zeros among the weights kept)")
    return "\n".join(lines)


__all__ = ["format_summary", "read_shard_metadata", "shard_metadata", "summarize"]
