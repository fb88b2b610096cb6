"""The Endor systems of `endor bench e2e` and the ratios between them.

One converted checkpoint per value codec (`--values raw,exp,int4`: the same magnitude mask, the
values stored raw, exponent-coded or quantized to int4 by round-to-nearest), each run through the
streaming pipeline once per compute (`--compute dense,fused`): system `endor-<values>-<compute>`.
In-RAM rows (every weight resident, nothing read per token): `ram-dense` is the dense checkpoint
through plain transformers, `ram-endor-<values>` the Endor checkpoint held compressed, computed
fused (compute "fused").

Ratios are per token time (the median over rounds): "A over B" is B's seconds per token over
A's, so above 1 means A is faster. Per codec, the headline uses its faster compute (what a
well-chosen compute="auto" would get)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, replace

from .e2e_checks import UNCHECKED

VALUES = ("raw", "exp", "int8", "int4")
COMPUTES = ("dense", "fused", "auto")
LOSSY = ("int8", "int4")
# The issues' bars (9: exp; 10: int4; 11: fused, time vs read, in RAM, batches).
DONE_WHEN = {
    "exp_vs_raw_min": 1.25,
    "exp_vs_dense_min": 2.3,
    "int4_vs_dense_min": 4.0,
    "endor_time_vs_read_max": 1.1,
    "endor_vs_accelerate_min": 2.0,
    "ram_endor_vs_dense_min": 1.4,
    "batch16_vs_batch1_min": 3.0,
}


@dataclass(frozen=True)
class Variant:
    values: str
    compute: str
    ram: bool = False
    verify: bool = True  # --checks off: load_model(verify=False), name ending -unchecked

    @property
    def name(self) -> str:
        name = f"ram-endor-{self.values}" if self.ram else f"endor-{self.values}-{self.compute}"
        return name if self.verify else name + UNCHECKED


def parse_names(text, allowed: tuple[str, ...], option: str) -> list[str]:
    """'raw, exp' -> ['raw', 'exp'] (a list passes through), every name checked."""
    names = [s.strip() for s in text.split(",") if s.strip()] if isinstance(text, str) \
        else list(text)
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise ValueError(f"{option}: unknown or no names {unknown}; choose from "
                         f"{','.join(allowed)}")
    return list(dict.fromkeys(names))


def expand(systems: list[str], values: list[str], computes: list[str]) -> list[str | Variant]:
    """'endor' becomes one system per codec and compute, 'ram-endor' one per codec."""
    out: list[str | Variant] = []
    for s in systems:
        if s == "endor":
            out += [Variant(v, c) for v in values for c in computes]
        elif s == "ram-endor":
            out += [Variant(v, "fused", ram=True) for v in values]
        else:
            out.append(s)
    return out


def with_checks(systems: list, checks: tuple[bool, ...]) -> list:
    """Each streamed Endor variant and the dense pipeline once per --checks setting (checked:
    its name; unchecked: name-unchecked); the others (Accelerate, in RAM) as they are."""
    out = []
    for s in systems:
        if isinstance(s, Variant) and not s.ram:
            out += [replace(s, verify=verify) for verify in checks]
        elif s == "dense":
            out += [s if verify else s + UNCHECKED for verify in checks]
        else:
            out.append(s)
    return out


def name_of(system) -> str:
    return system.name if isinstance(system, Variant) else system


def _faster(by: dict, values: str) -> dict | None:
    """The row of codec `values` (streamed) with the least time per token."""
    rows = [r for r in by.values() if r.get("values") == values and not r.get("ram") and
            not r["system"].endswith(UNCHECKED)]
    return min(rows, key=lambda r: r["s_per_token"]) if rows else None


def ratios(by: dict, rounds: dict) -> dict:
    """`by`: rows of one batch size by system name; `rounds`: seconds per token per round."""
    out = {}
    dense = by.get("dense")
    for name, row in by.items():
        if not name.startswith("endor-"):
            continue
        if dense:
            out[f"{name}_vs_dense"] = dense["s_per_token"] / row["s_per_token"]
            if name in rounds and "dense" in rounds:
                out[f"{name}_vs_dense_paired"] = statistics.median(
                    d / e for d, e in zip(rounds["dense"], rounds[name]))
            ideal_s = dense["s_per_token"] * row["mb_read_per_token"] / \
                dense["mb_read_per_token"]
            out[f"{name}_vs_ideal_time"] = row["s_per_token"] / ideal_s
        if row.get("read_ms"):
            out[f"{name}_time_vs_read"] = row["s_per_token"] * 1e3 / row["read_ms"]
    best = {v: _faster(by, v) for v in VALUES}
    best = {v: r for v, r in best.items() if r is not None}
    for v, row in best.items():
        out[f"{v}_best"] = row["system"]
        if dense:
            out[f"{v}_vs_dense"] = dense["s_per_token"] / row["s_per_token"]
        for acc in ("accelerate-cold", "accelerate"):
            if acc in by:
                out[f"{v}_vs_{acc.replace('-', '_')}"] = by[acc]["s_per_token"] / \
                    row["s_per_token"]
    if "raw" in best:
        for v in ("exp", "int8", "int4"):
            if v in best:
                out[f"{v}_vs_raw"] = best["raw"]["s_per_token"] / best[v]["s_per_token"]
        for c in COMPUTES:  # the same compute on both sides
            raw, exp = by.get(f"endor-raw-{c}"), by.get(f"endor-exp-{c}")
            if raw and exp:
                out[f"exp_vs_raw_{c}"] = raw["s_per_token"] / exp["s_per_token"]
    ram_dense = by.get("ram-dense")
    for name, row in by.items():
        if name.startswith("ram-endor-") and ram_dense:
            out[f"{name}_vs_ram_dense"] = ram_dense["s_per_token"] / row["s_per_token"]
    return out


def batch_ratios(rows: list[dict]) -> dict:
    """Tokens/s of each batch size over batch 1's, per system."""
    tps = {(r["system"], r["batch"]): r["decode_tokens_per_s"] for r in rows if "batch" in r}
    return {f"{system}_batch{b}_vs_batch1": v / tps[(system, 1)]
            for (system, b), v in tps.items() if b != 1 and (system, 1) in tps}


def met(ratios_: dict) -> dict:
    """Each bar of DONE_WHEN that this run measured: True/False."""
    out = {}
    for key, bar in (("exp_vs_raw", "exp_vs_raw_min"), ("exp_vs_dense", "exp_vs_dense_min"),
                     ("int4_vs_dense", "int4_vs_dense_min")):
        if key in ratios_:
            out[key] = ratios_[key] >= DONE_WHEN[bar]
    for v in VALUES:
        name = ratios_.get(f"{v}_best")
        if name and f"{name}_time_vs_read" in ratios_:
            out[f"{v}_time_vs_read"] = ratios_[f"{name}_time_vs_read"] <= \
                DONE_WHEN["endor_time_vs_read_max"]
        for acc in ("accelerate_cold", "accelerate"):
            if f"{v}_vs_{acc}" in ratios_:
                out[f"{v}_vs_{acc}"] = ratios_[f"{v}_vs_{acc}"] >= \
                    DONE_WHEN["endor_vs_accelerate_min"]
    for key, value in ratios_.items():
        if key.startswith("ram-endor-") and key.endswith("_vs_ram_dense"):
            out[key] = value >= DONE_WHEN["ram_endor_vs_dense_min"]
        if key.endswith("_batch16_vs_batch1") and key.startswith("endor-"):
            out[key] = value >= DONE_WHEN["batch16_vs_batch1_min"]
    return out
