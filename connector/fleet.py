"""Worker processes on this machine, for the demo, the tests and the benchmarks.

Each worker is a real ``tandem worker`` process, so killing one (SIGKILL) is a real crash.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from confluent_kafka import Producer


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class WorkerProcess:
    name: str
    config: Path
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def start(self) -> WorkerProcess:
        env = {**os.environ, **self.env, "TANDEM_MEMBER_ID": self.name}
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "connector", "worker", "--config", str(self.config)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """A crash: no goodbye, no flush."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def terminate(self, timeout_s: float = 30.0) -> int | None:
        if self.proc is None:
            return None
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-lines:])
        except OSError:
            return ""


class SteadyProducer:
    """Producers at a steady rate, one thread per topic, keyed so every partition gets data.

    ``counts`` holds what the cluster acknowledged, per (topic, partition): the reference
    a check compares the backup with.
    """

    def __init__(self, bootstrap: str, topics: list[str], rate: int, value_size: int = 100) -> None:
        self.counts: Counter[tuple[str, int]] = Counter()
        self.failed = 0
        self._bootstrap = bootstrap
        self._rate = rate
        self._size = value_size
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._one, args=(t,), daemon=True) for t in topics]

    def start(self) -> SteadyProducer:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> Counter[tuple[str, int]]:
        self._stop.set()
        for t in self._threads:
            t.join()
        return self.counts

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def _one(self, topic: str) -> None:
        p = Producer({"bootstrap.servers": self._bootstrap, "acks": "all", "linger.ms": 5})

        def delivered(err: object, msg: Any) -> None:
            with self._lock:
                if err is None:
                    self.counts[(msg.topic(), msg.partition())] += 1
                else:
                    self.failed += 1

        per_tick = max(1, self._rate // len(self._threads) // 20)
        i = 0
        while not self._stop.is_set():
            for _ in range(per_tick):
                body = f"{topic} update {i} ".encode()
                p.produce(
                    topic,
                    key=f"customer-{i % 97}".encode(),
                    value=(body * (self._size // len(body) + 1))[: self._size],
                    on_delivery=delivered,
                )
                i += 1
            p.poll(0)
            time.sleep(0.05)
        p.flush(30)
