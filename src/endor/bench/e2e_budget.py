"""What a memory budget holds, beside `endor bench e2e`'s timings: for the same `max_memory`, how
many decoder layers the runtime keeps resident with the dense checkpoint and with each Endor
checkpoint (resident Endor layers are held compressed and counted at their stored size: fused
compute, runtime/fused.py). Issue 11's bar: a budget that holds k >= 2 dense layers holds at
least 1.7k Endor layers.

Every count is the runtime's own plan: the model is loaded with that budget (compute "auto", as
a user gets it) and its `endor_memory_plan` (runtime/plan.py plan_memory) is read back, nothing
is recomputed here. Loading skips the streamed shards' checksum pass (verify=False): it changes
what is checked per read, not the plan."""

from __future__ import annotations

import gc

import torch

from ..runtime import load_model

DONE_WHEN = {"budget_layers_vs_dense_min": 1.7}
DEFAULT_FRACTIONS = (0.25, 0.5)


def parse_fractions(text) -> list[float]:
    """'0.25,0.5' -> [0.25, 0.5]; '' or 'none' -> []; each in (0, 1]."""
    if not isinstance(text, str):
        return [float(f) for f in text]
    if text.strip().lower() in ("", "none"):
        return []
    try:
        fractions = [float(f) for f in text.split(",") if f.strip()]
    except ValueError:
        raise ValueError(f"--plan-budgets: cannot read {text!r}; write fractions of the model's "
                         "bytes like 0.25,0.5, or none") from None
    if any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"--plan-budgets: every fraction must be in (0, 1], got {text!r}")
    return fractions


def plan_row(path, key: str, budget: int, device) -> dict:
    """The plan load_model makes for checkpoint `path` under `budget` bytes."""
    model = load_model(path, device=device, max_memory=budget, compute="auto", verify=False)
    try:
        plan = model.endor_memory_plan
        stats = model.endor_stats()
    finally:
        model.endor_close()
        del model
        gc.collect()
    resident = [plan.layer_bytes[i] for i in plan.resident]
    return {"checkpoint": key, "budget_bytes": budget, "compute": stats["compute"],
            "fused_layers": stats["fused_layers"], "resident_layers": len(plan.resident),
            "streamed_layers": len(plan.streamed), "rest_bytes": plan.rest_bytes,
            "resident_bytes": plan.resident_bytes,
            # what one decoder layer costs the budget (the first; they are alike here)
            "layer_budget_bytes": plan.layer_bytes[0] if plan.layer_bytes else 0,
            "resident_layer_bytes": sum(resident)}


def memory_plan(paths: dict, keys: list[str], model_bytes: int, fractions: list[float],
                device) -> dict:
    """Rows for the dense checkpoint and each Endor one (`keys`: value codecs) at each budget
    (a fraction of the dense model's bytes), their ratios and whether the bar is met."""
    rows = []
    for fraction in fractions:
        budget = int(fraction * model_bytes)
        for key in ["dense", *keys]:
            rows.append({"budget_fraction": fraction,
                         **plan_row(paths[key], key, budget, torch.device(device))})
    ratios, met = {}, {}
    for fraction in fractions:
        by = {r["checkpoint"]: r for r in rows if r["budget_fraction"] == fraction}
        dense = by["dense"]
        for key in keys:
            row = by[key]
            # the bytes ratio: layers per budget before rounding down to whole layers
            ratios[f"{key}_layer_bytes_vs_dense_at_{fraction}"] = \
                dense["layer_budget_bytes"] / max(row["layer_budget_bytes"], 1)
            if dense["resident_layers"]:
                name = f"{key}_resident_layers_vs_dense_at_{fraction}"
                ratios[name] = row["resident_layers"] / dense["resident_layers"]
                if dense["resident_layers"] >= 2:
                    met[name] = ratios[name] >= DONE_WHEN["budget_layers_vs_dense_min"]
    return {"rows": rows, "ratios": ratios, "met": met, "done_when": DONE_WHEN}
