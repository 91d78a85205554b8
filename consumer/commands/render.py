"""How every command writes numbers for people: percentages, points and money, one copy each."""

from __future__ import annotations


def percent(value: float | None, digits: int = 1, *, signed: bool = False) -> str:
    """``0.1234`` -> ``"12.3%"`` (``"+12.3%"`` when signed); ``"-"`` for None."""
    if value is None:
        return "-"
    return f"{100 * value:+.{digits}f}%" if signed else f"{100 * value:.{digits}f}%"


def points(value: float | None, digits: int = 2) -> str:
    """A difference of two shares in percentage points: ``0.0123`` -> ``"+1.23"``; ``"-"`` for None."""
    return "-" if value is None else f"{100 * value:+.{digits}f}"


def usd(value: float, digits: int = 4) -> str:
    """Dollars with thousands separators: ``1234.5`` -> ``"$1,234.5000"``."""
    return f"${value:,.{digits}f}"


def number(value: float | None, digits: int = 1) -> str:
    """A plain number with thousands separators; ``"-"`` for None."""
    return "-" if value is None else f"{value:,.{digits}f}"
