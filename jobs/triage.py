"""Trace-strength triage: per pair and layer, a few numbers that rank how readable the
finetuning trace is, from the pair's own tables (no model work). Definitions (README,
"Triage"):

- delta_ratio[p] = |delta[L, p]| / finetuned_norm[L] at positions 0..4 (the norm
  statistic of the difference table: the finetuned model's mean activation norm at
  positions >= norm_skip_positions);
- trace_strength = the mean of delta_ratio over positions 1..4 (position 0 is often BOS,
  whose activation is huge and shared by both models);
- steering_uplift[p] = similarity(steered, finetuning data) − similarity(unsteered,
  finetuning data) at (L, p), from similarity.parquet; its layer value is the mean over
  the positions that have one;
- best_grade = the highest mean hypothesis grade (1..5) of the ADL agent over its
  budgets, from agent.parquet (the pair's, on each of its layers).
Missing tables leave their numbers null.
"""
from __future__ import annotations

import math

from jobs.results import PairResults

RATIO_POSITIONS = (0, 1, 2, 3, 4)
STRENGTH_POSITIONS = (1, 2, 3, 4)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


def best_grade(results: PairResults) -> float | None:
    groups = results.agent_groups() or []
    grades = [g["mean_grade"] for g in groups if g["agent"] == "adl" and g["mean_grade"] is not None]
    return max(grades) if grades else None


def pair_triage(results: PairResults) -> dict[int, dict]:
    """layer -> {"delta_ratio": {position: ratio}, "trace_strength", "steering_uplift":
    {position: uplift}, "mean_steering_uplift", "best_grade"}; {} without a difference table."""
    norms = results.norms()
    if norms is None:
        return {}
    uplifts = {}
    for key, (steered, unsteered) in (results.similarity_to_data() or {}).items():
        if steered is not None and unsteered is not None:
            uplifts[key] = steered - unsteered
    grade = best_grade(results)
    out: dict[int, dict] = {}
    for layer, group in norms.groupby("layer"):
        layer = int(layer)
        ratios = {int(r.position): float(r.delta_norm) / float(r.finetuned_norm)
                  for r in group.itertuples() if int(r.position) in RATIO_POSITIONS and r.finetuned_norm > 0}
        uplift = {p: u for (l, p), u in uplifts.items() if l == layer}
        out[layer] = {"delta_ratio": ratios,
                      "trace_strength": _mean(ratios.get(p) for p in STRENGTH_POSITIONS),
                      "steering_uplift": uplift, "mean_steering_uplift": _mean(uplift.values()),
                      "best_grade": grade}
    return out
