"""Run the real service (and the stand-in LLM) as subprocesses, the way an operator would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

from tests.support.kafka import bootstrap, wait_for


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def service_env(**settings: Any) -> dict[str, str]:
    """Environment for ``shunt run``: SHUNT_<SECTION>__<KEY> from ``section__key=value`` keyword arguments."""
    # Settings from the outer environment do not leak in, except the model folder (to test another model).
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHUNT_") or k == "SHUNT_MODEL__PATH"}
    env["SHUNT_KAFKA__BOOTSTRAP_SERVERS"] = bootstrap()
    env["SHUNT_SERVICE__LOG_FORMAT"] = "json"
    env["SHUNT_ADMIN__PORT"] = "0"
    for key, value in settings.items():
        env["SHUNT_" + key.upper()] = str(value)
    return env


class Process:
    """A child process whose output goes to a log file the test can read after it ends."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("ab")
        self.proc = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait(self, timeout_s: float) -> int:
        code = self.proc.wait(timeout=timeout_s)
        self._log.close()
        return code

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._log.close()

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")


def start_service(log_path: Path, *args: str, **settings: Any) -> Process:
    return Process([sys.executable, "-m", "consumer", "run", *args], service_env(**settings), log_path)


def start_standin(log_path: Path, *args: str) -> tuple[Process, str]:
    """The stand-in LLM server on a free port; returns it and its base URL once it answers /stats."""
    port = free_port()
    proc = Process(
        [sys.executable, "-m", "consumer", "llm-standin", "--port", str(port), *args],
        {k: v for k, v in os.environ.items() if not k.startswith("SHUNT_")},
        log_path,
    )
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _answers(f"{url}/stats") or proc.proc.poll() is not None, 30, "stand-in answers /stats")
    assert proc.proc.poll() is None, proc.log()
    return proc, f"{url}/v1"


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def stats(base_url: str) -> dict[str, Any]:
    import orjson

    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/stats", timeout=5) as response:
        data: dict[str, Any] = orjson.loads(response.read())
        return data


def elapsed_since(start: float) -> float:
    return time.monotonic() - start


def control(base_url: str, **changes: Any) -> None:
    """Change the stand-in's faults while it runs (latency, error rates, limits)."""
    import orjson

    request = urllib.request.Request(
        base_url.removesuffix("/v1") + "/control",
        data=orjson.dumps(changes),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200


class Collector:
    """Keeps reading a topic from the start, collecting decoded JSON values, for waits during a run.

    A subscribed consumer rather than consumer.kafka.reader: it must ride out a broker restart (the fault
    tests), and the reader ends at an unknown topic, which a restarting broker may briefly report; that
    test cannot run against the shared broker, so the switch waits until it can be proved."""

    def __init__(self, topic: str) -> None:
        from confluent_kafka import Consumer

        from tests.support.kafka import unique

        self.values: list[dict[str, Any]] = []
        self._consumer = Consumer(
            {"bootstrap.servers": bootstrap(), "group.id": unique("collector"), "auto.offset.reset": "earliest",
             "enable.auto.commit": False}
        )  # fmt: skip
        self._consumer.subscribe([topic])

    def poll(self, seconds: float = 0.2) -> int:
        import orjson

        for message in self._consumer.consume(2000, seconds):
            if message.error() is None and message.value() is not None:
                self.values.append(orjson.loads(message.value()))
        return len(self.values)

    def wait_count(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.poll() < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s}s: {len(self.values)} of {count} messages")

    def ids(self) -> list[str]:
        return [str(v["id"]) for v in self.values]

    def close(self) -> None:
        self._consumer.close()
