"""The two plots of ``shunt eval``: accuracy against cost per method, and the small model's reliability."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from consumer.offline.evaluation.arithmetic import METHOD_NAMES, EvaluationError


def _figure(width: float, height: float) -> Any:
    """A figure on the Agg canvas, without pyplot's global state."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - the [train] extra
        from matplotlib.figure import Figure  # noqa: PLC0415 - loads only to draw
    except ModuleNotFoundError:
        raise EvaluationError("the plots need matplotlib: pip install 'data-shunt[train]'") from None
    figure = Figure(figsize=(width, height), dpi=150)
    FigureCanvasAgg(figure)
    return figure


_STYLES = {
    "ds": {"color": "#1f77b4", "marker": "o", "linestyle": "-", "markersize": 5},
    "ds_plus": {"color": "#d62728", "marker": "s", "linestyle": "--", "markersize": 4},
}


def plot_tradeoff(path: Path, report: Mapping[str, Any]) -> None:
    """Accuracy against cost ratio: a curve per method, the two baselines as points, the pick annotated."""
    figure = _figure(8, 5.5)
    axes = figure.subplots()
    for method, style in _STYLES.items():
        points = sorted((row[method] for row in report["sweep"]), key=lambda p: (p["cost_ratio"], p["accuracy"]))
        axes.plot([100 * p["cost_ratio"] for p in points], [100 * p["accuracy"] for p in points],
                  label=f"{METHOD_NAMES[method]} (threshold swept)", **style)  # fmt: skip
    small, llm = report["small_alone"], report["llm_alone"]
    axes.scatter(
        [0], [100 * small["accuracy"]], marker="^", s=130, color="#2ca02c", zorder=5, label="small model alone"
    )
    axes.scatter([100], [100 * llm["accuracy"]], marker="*", s=260, color="#7f7f7f", zorder=5, label="LLM alone")
    axes.axhline(100 * llm["accuracy"], color="#7f7f7f", linestyle=":", linewidth=1)
    _annotate_pick(axes, report["recommended"])
    axes.set_xlabel("cost, % of the LLM alone")
    axes.set_ylabel("accuracy, %")
    axes.set_title(f"Accuracy vs cost on {report['data']['reviews']} reviews (LLM: {report['llm']['model']})")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path)


def _annotate_pick(axes: Any, pick: Mapping[str, Any]) -> None:
    point = pick["point"]
    if point is None:
        return
    x, y = 100 * point["cost_ratio"], 100 * point["accuracy"]
    text = f"{point['name']} threshold {point['threshold']:g}\n{y:.2f}% at {x:.1f}% of the LLM cost"
    axes.annotate(text, xy=(x, y), xytext=(40, -60), textcoords="offset points", fontsize=9,
                  bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.9},
                  arrowprops={"arrowstyle": "->", "color": "black"})  # fmt: skip
    axes.scatter([x], [y], s=160, facecolors="none", edgecolors="black", linewidths=1.5, zorder=6)


def plot_reliability(path: Path, report: Mapping[str, Any]) -> None:
    """Accuracy by confidence bin against the diagonal, with the bins' counts underneath."""
    calibration = report["calibration"]
    bins = calibration["table"]
    figure = _figure(6, 6.5)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    full = [b for b in bins if b["count"]]
    width = bins[0]["high"] - bins[0]["low"]
    top.bar([b["low"] for b in full], [b["accuracy"] for b in full], width=width, align="edge",
            color="#1f77b4", edgecolor="black", label="accuracy in the bin")  # fmt: skip
    top.plot([0, 1], [0, 1], color="#7f7f7f", linestyle="--", label="perfect calibration")
    # The red marks sit at each bin's mean confidence: a bar below its mark is overconfident, above it under.
    top.scatter([(b["low"] + b["high"]) / 2 for b in full], [b["confidence"] for b in full], color="#d62728",
                marker="_", s=250, linewidths=2.5, zorder=5, label="mean confidence in the bin")  # fmt: skip
    top.set_ylabel("accuracy")
    top.set_ylim(0, 1)
    top.legend(loc="upper left")
    top.set_title(f"Small model reliability, {calibration['bins']} bins: ECE {100 * calibration['ece']:.2f}%")
    bottom.bar([b["low"] for b in bins], [b["count"] for b in bins], width=width, align="edge", color="#aec7e8",
               edgecolor="black")  # fmt: skip
    bottom.set_xlabel("confidence (top softmax probability, calibrated)")
    bottom.set_ylabel("reviews")
    bottom.set_xlim(0, 1)
    figure.tight_layout()
    figure.savefig(path)
