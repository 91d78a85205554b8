"""The closed loop's block as Prometheus families and as ``shunt top``'s table."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from rich.console import Console

from consumer.commands.top import loop_table
from consumer.observe.http import loop_metrics
from consumer.observe.meter import Counts
from consumer.observe.rates import now_block
from consumer.observe.summary import Fleet


def block() -> dict[str, Any]:
    interval = {"agreed": 45, "n": 50, "estimate": 0.9, "low": 0.78, "high": 0.97}
    counts = {"decided_small": 80, "decided_llm": 20, "audits": 50, "audit_agreed": 45, "audit_skipped": 2,
              "audit_failed": 0, "audit_prompt_tokens": 5000, "audit_completion_tokens": 250, "audit_cost_usd": 0.01,
              "budget_fallbacks": 3, "threshold_changes": 4, "agreement": interval}  # fmt: skip
    budget = {"usd_per_hour": 1.0, "priority": "spend", "allowance_usd": 0.002, "spent_usd": 0.001, "pressure": 0.5,
              "threshold": 0.8}  # fmt: skip
    return {"mode": "adaptive", "threshold": 0.92, "routed_share": 0.2, "llm_pending": 7, "audit_backlog": 1,
            "window": counts, "totals": counts, "drift_alarm": True, "drift_recent": interval,
            "budget": budget}  # fmt: skip


class Families:
    def __init__(self, loop: dict[str, Any]) -> None:
        self._loop = loop

    def collect(self) -> Any:
        return loop_metrics(self._loop)


def test_the_loop_block_becomes_prometheus_counters_and_gauges() -> None:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(Families(block()))
    text = generate_latest(registry).decode()
    for line in ('shunt_audits_total 50.0', 'shunt_audit_cost_usd_total 0.01', 'shunt_drift_alarm 1.0',
                 'shunt_audit_agreement{bound="high",scope="cumulative"} 0.97', 'shunt_routed_share 0.2',
                 'shunt_llm_pending 7.0', 'shunt_budget_pressure 0.5', 'shunt_budget_fallbacks_total 3.0'):  # fmt: skip
        assert line in text, line


def test_top_shows_the_loop_and_the_rates_now() -> None:
    window = Counts(reviews_in=100, labeled=90, cost_usd=0.01, baseline_cost_usd=0.05)
    now = now_block(window, 10.0, block())
    assert now["labeled_per_s"] == 9.0 and now["cost_usd_per_hour"] == 3.6 and now["routed_share"] == 0.2
    assert abs(now["savings_usd_per_hour"] - 14.4) < 1e-9 and abs(now["savings_share"] - 0.8) < 1e-9
    fleet = Fleet()
    message = {"instance_id": "a", "seq": 0, "final": False, "window_end_ms": 0, "loop": block(), "now": now}
    fleet.latest["a"] = message
    console = Console(width=250, record=True)
    console.print(loop_table(fleet))
    out = console.export_text()
    assert "0.920" in out and "ALARM" in out and "90.0% [78.0%, 97.0%] n=50" in out and "50% of $1.00/h" in out
