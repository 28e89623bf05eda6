"""A seeded random schedule of membership events against a local fleet, checked from outside.

Workers are killed (SIGKILL), restarted under the same member id, joined and stopped
(SIGTERM) while steady producers write; afterwards the primary, the backup topics, the
manifests and the mirror topic are read independently: nothing lost, nothing duplicated,
order kept, sequence numbers never reused, every manifest a prefix cut. The seed replays a
run: the schedule is a pure function of it (the timing of the machine is not).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from connector.config import load_settings
from connector.coordinator import read_manifests
from connector.fleet import SteadyProducer, WorkerProcess
from connector.timeline import read_timeline
from connector.verify import VerifyResult, verify

KINDS = ("kill", "restart", "join", "stop")


@dataclass
class Event:
    at_s: float
    kind: str
    worker: str


@dataclass
class ChaosResult:
    seed: int
    events: list[Event]
    produced: int
    sets: int
    verified: VerifyResult | None
    reused: list[str]
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


class Chaos:
    """Drives ``events`` membership events over a fleet of at most ``max_workers``."""

    def __init__(
        self,
        *,
        bootstrap: str,
        config: Path,
        log_dir: Path,
        topics: list[str],
        seed: int,
        events: int,
        min_workers: int = 3,
        max_workers: int = 6,
        rate: int = 300,
        pause_s: tuple[float, float] = (2.0, 5.0),
        say: Callable[[str], None] = print,
    ) -> None:
        self.bootstrap = bootstrap
        self.config = config
        self.log_dir = log_dir
        self.topics = topics
        self.seed = seed
        self.rng = random.Random(seed)
        self.n_events = events
        self.min_workers = min_workers
        self.names = [f"w{i}" for i in range(max_workers)]
        self.rate = rate
        self.pause_s = pause_s
        self.say = say
        self.fleet: dict[str, WorkerProcess] = {}
        self.events: list[Event] = []

    def running(self) -> list[str]:
        return sorted(n for n, w in self.fleet.items() if w.alive)

    def _start(self, name: str) -> None:
        self.fleet[name] = WorkerProcess(name, self.config, self.log_dir).start()

    def _next(self) -> tuple[str, str]:
        """Pick an event the fleet can take: never below one worker, never above the cap."""
        up = self.running()
        down = sorted(n for n in self.fleet if n not in up)
        fresh = [n for n in self.names if n not in self.fleet]
        options = []
        if len(up) > 1:
            options += [("kill", n) for n in up] + [("stop", n) for n in up]
        if down and len(up) < len(self.names):
            options += [("restart", n) for n in down]
        if fresh:
            options += [("join", n) for n in fresh]
        return self.rng.choice(options)

    def run(self, settle_timeout_s: float = 240) -> ChaosResult:
        started = time.monotonic()
        for name in self.names[: self.min_workers]:
            self._start(name)
        producer = SteadyProducer(self.bootstrap, self.topics, rate=self.rate).start()
        problems: list[str] = []
        try:
            time.sleep(8)  # the group forms and a few sets commit before the first event
            for _ in range(self.n_events):
                kind, name = self._next()
                event = Event(round(time.monotonic() - started, 1), kind, name)
                self.events.append(event)
                self.say(f"{event.at_s:7.1f}s  {kind:<7} {name}   running {self.running()}")
                if kind == "kill":
                    self.fleet[name].kill()
                elif kind == "stop":
                    self.fleet[name].proc.send_signal(15)  # type: ignore[union-attr]
                else:
                    self._start(name)
                time.sleep(self.rng.uniform(*self.pause_s))
            for name in list(self.fleet):
                w = self.fleet[name]
                if w.proc is not None and not w.alive and w.proc.returncode not in (0, -9, -15):
                    problems.append(f"{name} exited with {w.proc.returncode}: {w.log_tail(20)}")
            if not self.running():
                self._start(self.names[0])
        finally:
            counts = producer.stop()
        produced = sum(counts.values())
        if producer.failed:
            problems.append(f"{producer.failed} produce requests failed")
        settings = load_settings(self.config)
        client = settings.backup_cluster.aiokafka()
        deadline = time.monotonic() + settle_timeout_s
        sets = 0
        while True:
            manifests = asyncio.run(read_manifests(client, settings.sets_topic))
            if manifests:
                sets = len(manifests)
                last = manifests[max(manifests)]
                have = {(p.topic, p.partition): p.last_seq + 1 for p in last.portions}
                if all(have.get(tp, 0) >= n for tp, n in counts.items()):
                    break
            if time.monotonic() > deadline:
                problems.append(f"committed sets did not cover all {produced} updates in time")
                break
            time.sleep(1)
        verified = asyncio.run(verify(settings, all_sets=True)) if not problems else None
        if verified is not None and not verified.ok:
            problems.extend(str(p) for p in verified.problems[:20])
        timeline = asyncio.run(read_timeline(client, settings.group, settings.mirror.max_workers))
        problems.extend(timeline.reused[:20])
        return ChaosResult(
            self.seed, self.events, produced, sets, verified, timeline.reused, problems
        )

    def stop(self) -> None:
        for w in self.fleet.values():
            w.terminate(timeout_s=20)
