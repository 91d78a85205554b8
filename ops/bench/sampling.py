"""CPU and memory while a benchmark runs: a process's RSS and CPU, the broker's CPU, the whole machine's."""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading: wall and monotonic time, RSS (children included), cumulative CPU seconds, machine CPU."""

    wall: float
    mono: float
    rss: int
    cpu_s: float
    broker_cpu_s: float
    machine_busy_cores: float


@dataclass
class Sampler:
    """Samples a process's RSS and CPU, the broker's CPU and the whole machine's CPU, in a thread."""

    pid: int
    broker_pid: int | None = None
    interval_s: float = 0.5
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(self.pid)
            broker = _process(self.broker_pid)
            psutil.cpu_percent(None)
            cores = os.cpu_count() or 1
            while not self._stop.wait(self.interval_s):
                rss = proc.memory_info().rss + sum(_rss(child) for child in proc.children(recursive=True))
                busy = psutil.cpu_percent(None) * cores / 100
                sample = Sample(time.time(), time.monotonic(), rss, _cpu_s(proc), _cpu_s(broker), busy)
                self.samples.append(sample)

    def peak_rss(self) -> int:
        return max((s.rss for s in self.samples), default=0)

    def _cores(self, attr: str) -> float:
        if len(self.samples) < 2:
            return 0.0
        first, last = self.samples[0], self.samples[-1]
        spent: float = getattr(last, attr) - getattr(first, attr)
        return spent / max(last.mono - first.mono, 1e-9)

    def mean_cpu(self) -> float:
        """The process's mean CPU over the sampling, in percent of one core."""
        return self._cores("cpu_s") * 100

    def broker_cores(self) -> float:
        """Mean cores the Kafka broker used meanwhile (on this same machine)."""
        return self._cores("broker_cpu_s")

    def machine_cores(self) -> float:
        """Mean cores busy on the whole machine while sampling."""
        return statistics.fmean(s.machine_busy_cores for s in self.samples[1:] or self.samples) if self.samples else 0.0

    def others_cores(self) -> float:
        """Mean cores busy outside this process and the broker (other people's work): the noise to report."""
        if not self.samples:
            return 0.0
        return max(0.0, self.machine_cores() - self._cores("cpu_s") - self._cores("broker_cpu_s"))

    def cpu_between(self, start_s: float, end_s: float) -> tuple[float, float, float, tuple[float, float]] | None:
        """(service CPU s, broker CPU s, wall s, (from, to)) between the first sample at or after ``start_s``
        (wall clock) and the last at or before ``end_s``; None when the window holds fewer than two samples."""
        inside = [s for s in self.samples if start_s <= s.wall <= end_s]
        if len(inside) < 2:
            return None
        first, last = inside[0], inside[-1]
        cpu, broker = last.cpu_s - first.cpu_s, last.broker_cpu_s - first.broker_cpu_s
        return cpu, broker, last.wall - first.wall, (first.wall, last.wall)


def cpu_per_review(sampler: Sampler, stamps_ms: Sequence[int]) -> dict[str, float] | None:
    """Service and broker CPU microseconds per review in the steady window (first to last output)."""
    window = sampler.cpu_between(stamps_ms[0] / 1000, stamps_ms[-1] / 1000)
    if window is None:
        return None
    cpu_s, broker_s, wall_s, (start, end) = window
    reviews = max(1, sum(1 for t in stamps_ms if start * 1000 <= t <= end * 1000))
    return {
        "service_us_per_review": cpu_s / reviews * 1e6,
        "broker_us_per_review": broker_s / reviews * 1e6,
        "service_cores": cpu_s / wall_s,
        "broker_cores": broker_s / wall_s,
    }


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores, not idle or waiting for I/O) since boot."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) so far per OS thread id of ``pid``."""
    out: dict[int, float] = {}
    ticks = os.sysconf("SC_CLK_TCK")
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            out[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def _cpu_s(proc: psutil.Process | None) -> float:
    """Cumulative user + system CPU seconds of a process and its children."""
    if proc is None:
        return 0.0
    try:
        times = proc.cpu_times()
        return float(times.user + times.system + times.children_user + times.children_system)
    except psutil.Error:
        return 0.0


def _process(pid: int | None) -> psutil.Process | None:
    try:
        return psutil.Process(pid) if pid else None
    except psutil.Error:
        return None


def _rss(proc: psutil.Process) -> int:
    try:
        return int(proc.memory_info().rss)
    except psutil.Error:
        return 0
