"""Readiness of each worker, polled from outside: when a rebalance starts and ends.

A worker answers ``/readyz`` 503 ``rebalancing: ...`` from the moment the group revokes
its partitions until the new map is applied and its takeovers are done. That is the only
outside sign of the broker starting a rebalance, which splits failover time into session
expiry (kill -> revocation) and the broker's rebalance (revocation -> new map).
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ReadyProbe:
    """Polls every worker's /readyz and keeps each change: (ms, worker, reason or 'ready')."""

    ports: dict[str, int] = field(default_factory=dict)
    every_s: float = 0.02
    changes: list[tuple[int, str, str]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> ReadyProbe:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _state(self, port: int) -> str:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=0.5) as r:
                return "ready" if r.status == 200 else "?"
        except urllib.error.HTTPError as e:
            return str(json.loads(e.read() or b"{}").get("reason", "?"))
        except OSError:
            return "down"

    def _run(self) -> None:
        last: dict[str, str] = {}
        while not self._stop.is_set():
            for name, port in list(self.ports.items()):
                state = self._state(port)
                if last.get(name) != state:
                    last[name] = state
                    self.changes.append((int(time.time() * 1000), name, state))
            time.sleep(self.every_s)

    def first(self, after_ms: int, who: set[str], prefix: str) -> int | None:
        """When one of ``who`` first entered a state starting with ``prefix`` after after_ms."""
        return next(
            (t for t, n, s in self.changes if t > after_ms and n in who and s.startswith(prefix)),
            None,
        )
