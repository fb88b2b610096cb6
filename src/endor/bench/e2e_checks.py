"""`endor bench e2e --checks on,off`: what checking every byte costs, in the same run.

"off" times a twin of each of our pipelines (`endor-unchecked`, `dense-unchecked`) loaded with
load_model(verify=False): no per-read digest of the streamed shards, nothing checked at load. The
twins run in the same interleaved rounds as the checked systems, so the ratio of a round's two
runs (back to back) is the cost, its median over rounds the figure: robust to the shared machine
getting faster or slower between rounds. Done when checking costs at most 5% of tokens/s."""

from __future__ import annotations

import statistics

UNCHECKED = "-unchecked"
CHECKED_SYSTEMS = ("endor", "dense")  # the pipelines load_model(verify=...) switches
COST_MAX = 0.05


def parse_checks(value: str) -> tuple[bool, ...]:
    """"on", "off" or "on,off" -> (verify, ...) in that order, no repeats."""
    words = [w.strip() for w in value.split(",") if w.strip()]
    if not words or set(words) - {"on", "off"} or len(set(words)) != len(words):
        raise ValueError(f"--checks takes on, off or on,off; got {value!r}")
    return tuple(w == "on" for w in words)


def with_checks(systems: list[str], checks: tuple[bool, ...]) -> list[str]:
    """Each of our pipelines once per setting (checked: its name; unchecked: name-unchecked);
    the other systems (Accelerate) as they are."""
    out = []
    for s in systems:
        if s in CHECKED_SYSTEMS:
            out += [s if verify else s + UNCHECKED for verify in checks]
        else:
            out.append(s)
    return out


def base_system(system: str) -> tuple[str, bool]:
    """(the pipeline, whether it verifies): "endor-unchecked" -> ("endor", False)."""
    if system.endswith(UNCHECKED):
        return system[:-len(UNCHECKED)], False
    return system, True


def checks_ratios(by: dict, rounds: dict) -> dict:
    """Per pipeline timed both ways: tokens/s checked over unchecked (median of the rows, and
    paired within rounds) and the cost, 1 - the paired ratio."""
    ratios = {}
    for s in checked_systems(by):
        off = s + UNCHECKED
        if s in by and off in by:
            ratios[f"{s}_checked_vs_unchecked"] = by[off]["s_per_token"] / by[s]["s_per_token"]
            paired = statistics.median(u / c for u, c in zip(rounds[off], rounds[s]))
            ratios[f"{s}_checked_vs_unchecked_paired"] = paired
            ratios[f"{s}_checks_cost"] = 1.0 - paired
    return ratios


def checked_systems(by) -> list[str]:
    """The systems timed both ways: the pipelines, and each Endor variant (endor-<values>-<...>)
    of bench/e2e_variants.py."""
    return [s for s in by if (s in CHECKED_SYSTEMS or s.startswith("endor-")) and
            not s.endswith(UNCHECKED) and s + UNCHECKED in by]


def checks_met(ratios: dict) -> dict:
    return {key: value <= COST_MAX for key, value in ratios.items()
            if key.endswith("_checks_cost")}
