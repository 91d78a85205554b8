"""The broker a benchmark runs against: given, already running, or started here (and then stopped here)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import psutil

from ops.bench.report import REPO

KAFKA_SH = REPO / "ops" / "kafka" / "kafka.sh"


@dataclass
class Broker:
    """The bootstrap address, and whether this benchmark started the broker (then it stops it)."""

    bootstrap: str
    started_here: bool = False

    def stop(self) -> None:
        if self.started_here:
            subprocess.run(["bash", str(KAFKA_SH), "stop"], check=False, capture_output=True)


def _kafka_sh(*args: str) -> tuple[int, str]:
    done = subprocess.run(["bash", str(KAFKA_SH), *args], capture_output=True, text=True, check=False)
    return done.returncode, done.stdout


def _address(stdout: str) -> str | None:
    match = re.search(r"^KAFKA_BOOTSTRAP=(\S+)$", stdout, re.MULTILINE)
    return match.group(1) if match else None


@contextlib.contextmanager
def broker(bootstrap: str | None) -> Iterator[Broker]:
    """``--bootstrap``, else ``KAFKA_BOOTSTRAP``, else the running project broker, else start one (and stop it)."""
    given = bootstrap or os.environ.get("KAFKA_BOOTSTRAP")
    handle: Broker | None = Broker(given) if given else None
    if handle is None:
        code, out = _kafka_sh("status")
        running = _address(out) if code == 0 else None
        handle = Broker(running) if running else None
    if handle is None:
        code, out = _kafka_sh("start", "--port", "auto")
        started = _address(out)
        if code != 0 or started is None:
            raise SystemExit("could not start Kafka with ops/kafka/kafka.sh start --port auto")
        handle = Broker(started, started_here=True)
    try:
        yield handle
    finally:
        handle.stop()


def broker_pid(bootstrap: str) -> int | None:
    """The process listening on the bootstrap port on this machine, if any (to sample its CPU)."""
    port = int(bootstrap.split(",", maxsplit=1)[0].rsplit(":", 1)[1])
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return int(conn.pid)
    return None
