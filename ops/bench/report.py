"""Where results go and what they were measured on: the paths, the console, the JSON files, the machine."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import confluent_kafka
import onnxruntime
import orjson
import psutil
import tokenizers
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[2]
BENCH_DIR = REPO / ".bench"
LOG_DIR = BENCH_DIR / "logs"
console = Console(width=150)


def machine() -> dict[str, Any]:
    """What the numbers were measured on; the load average matters on a shared 2-core box."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "confluent_kafka": _version(confluent_kafka.version()),
        "librdkafka": confluent_kafka.libversion()[0],
        "onnxruntime": onnxruntime.__version__,
        "tokenizers": tokenizers.__version__,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def _version(value: Any) -> str:
    """confluent-kafka's ``version()`` is a string in some releases and (string, int) in others."""
    return str(value[0] if isinstance(value, tuple) else value)


def write_json(name: str, data: dict[str, Any]) -> Path:
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    path = BENCH_DIR / f"{name}.json"
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS) + b"\n")
    console.print(f"wrote {path.relative_to(REPO)}")
    return path


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    out = Table(title=title)
    for index, column in enumerate(columns):
        out.add_column(column, justify="left" if index == 0 else "right")
    for row in rows:
        out.add_row(*row)
    console.print(out)


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")
