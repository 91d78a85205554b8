"""How the stand-in starts (:class:`StandinConfig`) and the faults that can change while it runs.

``POST /control`` replaces fault fields at run time (:func:`apply_control`); a ``storm`` and
``reset_stats`` are handled by the app, not here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

PolicyName = Literal["replay", "oracle", "first"]
RATES = ("error_rate", "timeout_rate", "malformed_rate", "out_of_set_rate")
BATCH_RATES = ("batch_failure_rate", "batch_item_failure_rate", "batch_expire_rate")


@dataclass(frozen=True)
class Faults:
    """What can change while the server runs (``POST /control``)."""

    error_rate: float = 0.0
    timeout_rate: float = 0.0
    malformed_rate: float = 0.0
    out_of_set_rate: float = 0.0
    latency_ms: tuple[float, float] = (0.0, 0.0)
    hang_s: float = 30.0
    rpm: int | None = None
    tpm: int | None = None
    batch_turnaround_s: float = 1.0
    batch_failure_rate: float = 0.0
    batch_item_failure_rate: float = 0.0
    batch_expire_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in BATCH_RATES:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)!r}")
        if self.batch_turnaround_s < 0:
            raise ValueError("batch_turnaround_s must be >= 0")
        for name in RATES:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)!r}")
        if sum(getattr(self, name) for name in RATES) > 1.0 + 1e-9:
            raise ValueError("error, timeout, malformed and out-of-set rates add up to more than 1")
        low, high = self.latency_ms
        if not 0 <= low <= high:
            raise ValueError(f"latency must be LO-HI with 0 <= LO <= HI, got {low}-{high}")
        if self.hang_s < 0 or (self.rpm is not None and self.rpm < 1) or (self.tpm is not None and self.tpm < 1):
            raise ValueError("hang_s must be >= 0 and rpm/tpm >= 1 (or unset)")


@dataclass(frozen=True)
class StandinConfig:
    """How to start the stand-in. ``api_key``, when set, is required as a Bearer token (never shown)."""

    host: str = "127.0.0.1"
    port: int = 0
    policy: PolicyName = "first"
    labels: Path | None = None
    accuracy: float = 1.0
    hard_accuracy: float | None = None
    seed: int = 0
    faults: Faults = field(default_factory=Faults)
    api_key: str | None = field(default=None, repr=False)
    model: str = "standin"
    keep_bodies: int = 50

    def __post_init__(self) -> None:
        if self.policy in ("replay", "oracle") and self.labels is None:
            raise ValueError(f"policy {self.policy!r} needs a label file (--labels FILE)")
        for name in ("accuracy", "hard_accuracy"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value!r}")


def parse_latency(text: str) -> tuple[float, float]:
    """``"200-800"`` or ``"50"`` (milliseconds) -> (low, high). ValueError when it is neither."""
    low, sep, high = text.partition("-")
    try:
        pair = (float(low), float(high) if sep else float(low))
    except ValueError:
        raise ValueError(f"expected LO-HI milliseconds like 200-800, got {text!r}") from None
    if not 0 <= pair[0] <= pair[1]:
        raise ValueError(f"expected 0 <= LO <= HI, got {text!r}")
    return pair


def apply_control(faults: Faults, changes: Mapping[str, Any]) -> Faults:
    """``faults`` with the fields in ``changes`` replaced; ValueError on unknown fields or bad values."""
    known = {f.name for f in dataclasses.fields(Faults)}
    unknown = set(changes) - known
    if unknown:
        raise ValueError(f"unknown fault settings: {sorted(unknown)}")
    values = dict(changes)
    if "latency_ms" in values:
        low, high = values["latency_ms"]
        values["latency_ms"] = (float(low), float(high))
    return dataclasses.replace(faults, **values)
