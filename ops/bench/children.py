"""The service and the stand-in LLM as child processes of a benchmark, their settings, and waiting on them."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, Any

import psutil

from ops.bench.report import LOG_DIR

PYTHON = sys.executable
REMOVED = {"BENCH_PROTO": "the prototypes module was removed; issue 18 merges its changes into the service"}


def wait_for(condition: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout_s}s")
        time.sleep(interval_s)  # re-check a condition on another process or the broker, with a deadline


class Child:
    """A child process with its output in a log file; killed (with its children) when the block ends."""

    def __init__(self, name: str, args: list[str], env: dict[str, str]) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        self.log_path = LOG_DIR / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        self.started_ms = time.time_ns() // 1_000_000
        self.proc = subprocess.Popen(args, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *_: object) -> None:
        self.kill()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout_s: float) -> int:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"{self.log_path.stem} did not finish within {timeout_s}s") from None

    def terminate(self, timeout_s: float = 30) -> int | None:
        """SIGTERM (the service drains and commits), then SIGKILL after ``timeout_s``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=timeout_s)
        self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                child.kill()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._log.close()

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _clean_env() -> dict[str, str]:
    """This environment without any SHUNT_ setting, so the outer shell cannot change a run."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SHUNT_")}


def service_env(bootstrap: str, settings: Mapping[str, Any], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of ``shunt run``: SHUNT_<SECTION>__<KEY> from ``section__key`` settings, then ``extra``."""
    env = _clean_env() | {
        "SHUNT_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
        "SHUNT_SERVICE__LOG_FORMAT": "json",
        "SHUNT_ADMIN__PORT": "0",
    }
    env |= {"SHUNT_" + key.upper(): str(value) for key, value in settings.items()}
    return env | dict(extra or {})


def start_service(
    name: str, bootstrap: str, settings: Mapping[str, Any], extra: Mapping[str, str] | None = None
) -> Child:
    return Child(name, [PYTHON, "-m", "consumer", "run"], service_env(bootstrap, settings, extra))


@contextlib.contextmanager
def standin(name: str, latency_ms: str) -> Iterator[str]:
    """The stand-in LLM on a free port (no limits of its own); yields its base URL."""
    port = _free_port()
    args = [PYTHON, "-m", "consumer", "llm-standin", "--port", str(port), "--latency-ms", latency_ms]
    args += ["--log-level", "warning"]
    with Child(name, args, _clean_env()) as child:
        wait_for(lambda: standin_answers(port) or child.proc.poll() is not None, 30)
        if child.proc.poll() is not None:
            raise RuntimeError(f"the stand-in LLM exited:\n{child.log_tail()}")
        yield f"http://127.0.0.1:{port}/v1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def standin_answers(port: int) -> bool:
    """True once the stand-in LLM on ``port`` answers ``/stats``."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def parse_env_pairs(pairs: Sequence[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings (environment variables: SHUNT_<SECTION>__<KEY>, TOKENIZERS_PARALLELISM, ...)."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
            raise SystemExit(f"expected an environment variable KEY=VALUE, got {pair!r}")
        if key in REMOVED:
            raise SystemExit(f"{key}: {REMOVED[key]}")
        out[key] = value
    return out
