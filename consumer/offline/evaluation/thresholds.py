"""Choosing a threshold from a sweep: the most accurate, the cheapest at the LLM's accuracy, the best under
a cost cap; the config that sets it; and the ``--thresholds`` list parser."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from consumer.offline.evaluation.arithmetic import Point

# The budget `shunt eval` recommends for unless told otherwise: the paper's DS+ operating point, 31.18% of
# the LLM alone's cost (rounded down). A budget is the question a user asks ("what does a third of the bill
# buy?"); "the cheapest threshold as accurate as the LLM alone" answers a different one and buys the least
# accuracy that still ties, so it is reported but recommended only without a cap.
DEFAULT_COST_CAP = 0.31


def best_accuracy(points: Sequence[Point]) -> Point | None:
    """The most accurate point; ties go to the cheaper, then to the lower threshold."""
    return min(points, key=lambda p: (-p.accuracy, p.cost_ratio, p.threshold or 0.0), default=None)


def cheapest_reaching(points: Sequence[Point], target: float) -> Point | None:
    """The cheapest point at least as accurate as ``target``; ties go to the more accurate; None if none is."""
    good = [p for p in points if p.accuracy >= target]
    return min(good, key=lambda p: (p.cost_ratio, -p.accuracy, p.threshold or 0.0), default=None)


def best_under_cap(points: Sequence[Point], cap: float) -> Point | None:
    """The most accurate point whose cost ratio is at most ``cap``; None if every point costs more."""
    return best_accuracy([p for p in points if p.cost_ratio <= cap])


@dataclass(frozen=True, slots=True)
class Choice:
    """A threshold chosen for a goal, with the config that sets it. ``point`` None: no threshold meets it."""

    goal: str
    method: str
    point: Point | None
    toml: str | None
    env: str | None


GOALS = {
    "best_accuracy": "highest accuracy",
    "cheapest_at_llm_accuracy": "lowest cost with accuracy >= LLM alone",
    "cost_cap": "highest accuracy within the cost cap",
}


def config_snippet(threshold: float) -> tuple[str, str]:
    """(TOML, environment variable) that set the router threshold; ``repr`` keeps 1.0 a TOML float."""
    value = repr(float(threshold))
    return f"[router]\nthreshold = {value}", f"SHUNT_ROUTER__THRESHOLD={value}"


def choose(goal: str, method: str, point: Point | None) -> Choice:
    """Wrap a chosen point with its config snippet."""
    if point is None or point.threshold is None:
        return Choice(goal, method, None, None, None)
    toml, env = config_snippet(point.threshold)
    return Choice(goal, method, point, toml, env)


def choices(points: Sequence[Point], method: str, llm_accuracy: float, cost_cap: float | None) -> list[Choice]:
    """The threshold for each goal (the cost-cap goal only when a cap is given)."""
    out = [
        choose("best_accuracy", method, best_accuracy(points)),
        choose("cheapest_at_llm_accuracy", method, cheapest_reaching(points, llm_accuracy)),
    ]
    if cost_cap is not None:
        out.append(choose("cost_cap", method, best_under_cap(points, cost_cap)))
    return out


def recommended(found: Sequence[Choice], cost_cap: float | None) -> Choice:
    """The one to paste: the cost-cap choice when a cap is given, else the cheapest at LLM-alone accuracy,
    else (no threshold reaches it) the most accurate."""
    by_goal = {c.goal: c for c in found}
    order = ("cost_cap",) if cost_cap is not None else ("cheapest_at_llm_accuracy", "best_accuracy")
    for goal in order:
        if by_goal[goal].point is not None:
            return by_goal[goal]
    return by_goal[order[0]]


def parse_thresholds(text: str) -> tuple[float, ...]:
    """``"0,0.5,0.9"`` -> sorted unique thresholds; ValueError for anything outside [0, 1] or not a number."""
    values = set()
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"not a number: {part.strip()!r}") from None
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"thresholds must be between 0 and 1, got {value}")
        values.add(value)
    if not values:
        raise ValueError("no thresholds given")
    return tuple(sorted(values))
