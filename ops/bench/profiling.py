"""Where the service's time goes: py-spy samples of the running service, by thread and by pipeline stage.

Three views of the same window of one throughput run:

* ``wall`` (``py-spy --idle``): for each Python thread, the share of wall time it spends in each stage,
  waiting included (the scorer thread waiting for tokenizers' Rust pool counts as tokenising);
* ``gil`` (``py-spy --gil``): the share of wall time any thread holds the interpreter lock, and which;
* ``cpu``: CPU seconds per OS thread from /proc over the window, Python threads named from py-spy's
  samples, every other thread (librdkafka, ONNX Runtime's pool, tokenizers' rayon pool) summed as native.

py-spy is a profiling tool only (``.venv/bin/pip install py-spy``), never a project dependency; without it
the profile is skipped.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from ops.bench.report import BENCH_DIR, table
from ops.bench.sampling import thread_cpu

RATE_HZ = 100
_F = r"(?:^|\.)"  # a frame's function, bare or qualified by its class
# (stage, pattern on one frame); scanning a stack from the leaf up, the first frame matching a rule wins.
STAGES: tuple[tuple[str, str], ...] = (
    ("idle: event loop waiting (select)", _F + r"(select|poll) \(selectors\.py"),
    ("idle: executor thread waiting for work", r"^_worker \(concurrent/futures/thread\.py:81\)"),
    ("tokenise (encode_batch, ids)", _F + r"encode(\.<locals>\.<listcomp>)? \(consumer/small/scoring\.py"),
    ("numpy feeds (padding)", _F + r"_feeds \(consumer/small/scoring\.py"),
    ("ONNX session.run", _F + r"logits \(consumer/small/scoring\.py"),
    ("softmax + Prediction objects", _F + r"(probabilities|predict) \(consumer/small/scoring\.py"),
    ("hand result back to the loop", r"Future\.set_result \(concurrent/futures"),
    (
        "consume() in librdkafka (incl. waiting)",
        _F + r"poll \(consumer/kafka/source\.py|_WorkItem\.run .*kafka-consumer",
    ),
    ("decode + validate input", _F + r"decode \(consumer/stream/decoding\.py"),
    ("build output dict", _F + r"labeled \(consumer/stream/outputs\.py"),
    ("serialise output (orjson)", _F + r"dumps \(consumer/contracts\.py"),
    ("baseline token estimate", _F + r"estimate_prompt_tokens \("),
    ("metering (Meter.on_labeled)", r"\(consumer/observe/meter\.py"),
    ("offset tracking", r"\(consumer/stream/offsets\.py"),
    ("produce() into librdkafka", _F + r"(publish|publish_all|_produce_now) \(consumer/kafka/sink\.py"),
    ("delivery reports: producer.poll", _F + r"_serve_reports \(consumer/kafka/sink\.py"),
    ("delivery reports on the loop", _F + r"(_delivered|_drain) \(consumer/kafka/sink\.py"),
    ("completion callbacks (_finish_one)", _F + r"(_finish_one|__call__) \(consumer/stream/(pipeline|completion)\.py"),
    ("accept batch (per-message glue)", _F + r"(_accept \(consumer/stream/pipeline|\w+ \(consumer/kafka/message)\.py"),
    (
        "dispatch / publish glue",
        _F + r"(_dispatch\w*|_small|_labeled|_publish_labeled|_score_loop) \(consumer/stream/pipeline\.py",
    ),
    ("score() hop (executor handoff)", _F + r"(score|each|_feed) \(consumer/small/scoring\.py"),
    ("metrics emitter / admin", r"\(consumer/observe/(emitter|http|wiring)\.py"),
)
# Generic frames that sit under the specific ones (the loop runs every callback): used only when no
# specific rule matches anywhere in the stack.
GENERIC: tuple[tuple[str, str], ...] = (("asyncio event loop machinery", r"\(asyncio/"),)
_THREAD = re.compile(r"^thread \((\d+)\): (.*)$")


def py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def record(pid: int, seconds: int, mode: str) -> Path | None:
    """Sample ``pid`` for ``seconds``; ``mode`` is ``wall`` or ``gil``. Returns the raw (collapsed) file."""
    exe = py_spy()
    if exe is None:
        return None
    out = BENCH_DIR / f"throughput-profile-{mode}.txt"
    args = [exe, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(RATE_HZ)]
    args += ["--format", "raw", "--threads", "--nonblocking", "--output", str(out)]
    args.append("--gil" if mode == "gil" else "--idle")
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    return out if done.returncode == 0 and out.exists() else None


def _stacks(path: Path) -> Counter[tuple[str, ...]]:
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def _thread(frames: tuple[str, ...]) -> tuple[int, str]:
    """(OS thread id, Python thread name without the executor's ``_0`` suffix)."""
    match = _THREAD.match(frames[0]) if frames else None
    if match is None:
        return 0, "?"
    return int(match.group(1)), re.sub(r"_\d+$", "", match.group(2))


def _stage(frames: tuple[str, ...]) -> str:
    for rules in (STAGES, GENERIC):
        for frame in reversed(frames[1:]):
            for stage, pattern in rules:
                if re.search(pattern, frame):
                    return stage
    return "other Python"


def summarise(path: Path, seconds: float) -> dict[str, Any]:
    """Share of wall time per thread and stage (samples / rate / seconds), and the Python threads' ids."""
    by_thread: dict[str, Counter[str]] = defaultdict(Counter)
    tids: dict[int, str] = {}
    for frames, count in _stacks(path).items():
        tid, name = _thread(frames)
        tids[tid] = name
        by_thread[name][_stage(frames)] += count
    scale = 1 / (RATE_HZ * seconds)
    shares = {
        name: {stage: round(n * scale, 3) for stage, n in stages.most_common()} for name, stages in by_thread.items()
    }
    return {"seconds": seconds, "threads": shares, "tids": tids}


def cpu_by_thread(
    before: dict[int, float], after: dict[int, float], names: dict[int, str], seconds: float
) -> dict[str, Any]:
    """Cores used per Python thread over a window, the rest as native threads."""
    cores: dict[str, float] = defaultdict(float)
    for tid, spent in after.items():
        name = names.get(tid, "native threads (librdkafka, ORT, rayon)")
        cores[name] += (spent - before.get(tid, 0.0)) / seconds
    return {name: round(value, 3) for name, value in sorted(cores.items(), key=lambda kv: -kv[1])}


def profile(pid: int, seconds: int) -> dict[str, Any]:
    """The three views of ``pid``: wall (with CPU per thread over the same window), then gil."""
    before, started = thread_cpu(pid), time.monotonic()
    wall_path = record(pid, seconds, "wall")
    after, elapsed = thread_cpu(pid), time.monotonic() - started
    gil_path = record(pid, seconds, "gil")
    wall = summarise(wall_path, seconds) if wall_path else None
    return {
        "wall": wall,
        "gil": summarise(gil_path, seconds) if gil_path else None,
        "cpu": cpu_by_thread(before, after, wall["tids"] if wall else {}, elapsed),
    }


def show(profile: dict[str, Any]) -> None:
    """Wall share per stage and thread, GIL share per stage and thread, and cores per thread."""
    name = profile.get("variant", "default")
    for key, title in (
        ("wall", f"service ({name}): where each thread's wall time goes (py-spy --idle), share of the window"),
        ("gil", f"service ({name}): who holds the GIL (py-spy --gil), share of the window"),
    ):
        data = profile.get(key)
        if not data:
            continue
        threads = [t for t in data["threads"] if t != "?"]
        stages = sorted({s for t in threads for s in data["threads"][t]}, key=lambda s: _order(s, data, threads))
        rows = [(s, *[_cell(data["threads"][t].get(s)) for t in threads]) for s in stages]
        rows.append(("total", *[_cell(sum(data["threads"][t].values())) for t in threads]))
        table(title, ["stage", *threads], rows)
    if profile.get("cpu"):
        title = f"service ({name}): CPU per thread over the window (/proc), cores"
        table(title, ["thread", "cores"], _cpu_rows(profile["cpu"]))


def _order(stage: str, data: dict[str, Any], threads: list[str]) -> float:
    return -float(sum(data["threads"][t].get(stage, 0.0) for t in threads))


def _cell(value: float | None) -> str:
    return "" if not value else f"{value:.1%}"


def _cpu_rows(cpu: dict[str, float]) -> list[tuple[str, str]]:
    rows = [(name, f"{cores:.2f}") for name, cores in cpu.items()]
    rows.append(("total", f"{sum(cpu.values()):.2f}"))
    return rows
