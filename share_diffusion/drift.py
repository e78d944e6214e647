"""Each style's drift: its error against the ΔW it was learned or imported with, and its budget.

A style's error is ‖ΔW − ΔŴ‖_F / ‖ΔW‖_F, the largest over the layers, where ΔW is what the style
was when it was learned or imported and ΔŴ what the library gives back now. It is kept exactly,
without keeping ΔW itself:

- A merge moves a style by its step error s = δ + ρ (relative to ΔŴ before the merge): δ, the
  projection onto the new basis, measured exactly, and ρ, a bound on the float32 rounding of what
  is stored (share.merge_styles). The recorded error becomes e + s·(1 + e), which can never be
  below the true error (triangle inequality; ‖ΔŴ‖ ≤ (1 + e)‖ΔW‖).
- Without a size limit, k grows until δ ≤ share.EXACT for every style: no style is cut, and its
  error stays at the float rounding, about 1e-7 per merge.
- A size limit can force a cut (δ > EXACT). The first cut of a style measures it against a ΔŴ
  that still equals its ΔW to float rounding, so its error stays exact to that rounding. A
  second cut can only be bounded (its reference is gone): the record then says `error_exact`
  false, and the error is shown as "at most".

Each style has a drift budget (default share.DRIFT_BUDGET, 1%). A merge that would cut any style
past its budget is refused before anything is written, with the styles and how far they would
drift (DriftError); float rounding alone is never refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import share
from .library import LibraryError


class DriftError(LibraryError):
    """A merge that would leave styles past their drift budget under the size limit."""


@dataclass
class StyleDrift:
    """What one merge does to one style (errors relative to the style's own ΔW, max over layers)."""

    id: str
    name: str
    budget: float
    before: float  # the recorded error before the merge
    after: float  # ... and after it
    step: float  # the step error s = δ + ρ (largest over layers)
    cut: bool  # whether the merge cut the style's directions (δ > share.EXACT in some layer)
    exact: bool  # whether `after` is exact (to float rounding) rather than a bound

    @property
    def over_budget(self) -> bool:
        return self.cut and self.after > self.budget


def allowance(record: dict) -> float:
    """The step error a style may still take: e + s(1 + e) ≤ budget ⇔ s ≤ (budget − e)/(1 + e)."""
    error = record["error"]
    return max(record["drift_budget"] - error, 0.0) / (1 + error)


def merge_outcome(meta: dict, style_ids: list[str], new_records: list[dict],
                  plan: dict[str, share.Merge]) -> list[StyleDrift]:
    """Every style's drift in a planned merge (share.plan_merge). style_ids: the model's styles in
    merge order (the plan's rows), then the new ones, whose records are `new_records`."""
    records = {r["id"]: r for r in [*meta["styles"], *new_records]}
    steps = {i: 0.0 for i in style_ids}
    cut = {i: False for i in style_ids}
    for merge in plan.values():
        for i, projection, rounding in zip(style_ids, merge.step_errors.tolist(), merge.rounding_errors.tolist()):
            steps[i] = max(steps[i], projection + rounding)
            cut[i] = cut[i] or projection > share.EXACT
    outcome = []
    for i in style_ids:
        record = records[i]
        before = record["error"]
        exact = record["error_exact"] and not (cut[i] and record["cuts"] >= 1)
        outcome.append(StyleDrift(i, record["name"], record["drift_budget"], before,
                                  before + steps[i] * (1 + before), steps[i], cut[i], exact))
    return outcome


def percent(value: float) -> str:
    return f"{100 * value:.3g}%"


def error_text(record: dict) -> str:
    """A style's recorded error for people: "3.1e-07", or "≤ 2.0e-03" where it is only a bound."""
    return ("" if record["error_exact"] else "≤ ") + f"{record['error']:.1e}"


def check_budgets(outcome: list[StyleDrift], size_limit: int | None) -> None:
    """Refuse a merge that cuts any style past its budget; the message names each one."""
    over = sorted((d for d in outcome if d.over_budget), key=lambda d: -d.after)
    if not over:
        return
    shown = ", ".join(f"{d.name!r} to {percent(d.after)} (budget {percent(d.budget)})" for d in over[:8])
    more = f" and {len(over) - 8} more" if len(over) > 8 else ""
    raise DriftError(
        f"nothing was merged: under the size limit of {size_limit} basis directions per layer, "
        f"{len(over)} style{'s' * (len(over) != 1)} would drift past {'their' if len(over) != 1 else 'its'} budget: "
        f"{shown}{more}; raise the size limit, raise the drift budget, or remove styles first"
    )


def record_merge(meta: dict, outcome: list[StyleDrift], action: str, style: str, basis_rank: int, at: str) -> None:
    """Store each style's error from this merge, and the merge itself, in the metadata."""
    number = len(meta["merges"]) + 1
    records = {r["id"]: r for r in meta["styles"]}
    for drift in outcome:
        record = records[drift.id]
        record["error"] = drift.after
        record["error_exact"] = drift.exact
        record["cuts"] += drift.cut
        record["error_history"].append({"merge": number, "step_error": drift.step, "error": drift.after,
                                        "cut": drift.cut})
    meta["merges"].append({"number": number, "action": action, "style": style, "at": at, "basis_rank": basis_rank})
