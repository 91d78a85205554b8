"""What is happening now: the ``now`` block of metrics.v1, rates over the window just closed.

The completion-time totals (``window``, ``totals``) reconcile with the output topic but lag behind an LLM
backlog: a review routed to the LLM counts only once its answer is delivered. These figures say what the
router decides as it decides (the closed loop counts every decision), how much LLM work is pending, how
fast labels go out, and spend and savings as rates.
"""

from __future__ import annotations

from typing import Any

from consumer.observe.meter import Counts, ratio

_HOUR_S = 3600.0


def now_block(window: Counts, seconds: float, loop: dict[str, Any] | None) -> dict[str, Any]:
    """Rates over a window of ``seconds``; the decision-time figures come from the loop block (if any)."""
    seconds = max(seconds, 1e-3)
    audit_usd = 0.0 if loop is None else float(loop["window"]["audit_cost_usd"])
    return {
        "reviews_in_per_s": window.reviews_in / seconds,
        "labeled_per_s": window.labeled / seconds,
        "routed_share": None if loop is None else loop["routed_share"],
        "llm_pending": None if loop is None else loop["llm_pending"],
        "cost_usd_per_hour": window.cost_usd / seconds * _HOUR_S,
        "audit_cost_usd_per_hour": audit_usd / seconds * _HOUR_S,
        "baseline_usd_per_hour": window.baseline_cost_usd / seconds * _HOUR_S,
        "savings_usd_per_hour": (window.baseline_cost_usd - window.cost_usd) / seconds * _HOUR_S,
        "savings_share": None if (r := ratio(window.cost_usd, window.baseline_cost_usd)) is None else 1.0 - r,
    }
