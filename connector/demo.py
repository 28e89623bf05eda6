"""``tandem demo``: the whole story on one machine, ending by itself.

It starts the embedded broker, creates two primary topics, runs steady producers and real
worker processes, and shows from the outside (control and sets topics) how portions are
owned and mirrored and how consistent sets commit; then it verifies the backup against the
primary and reports the RPO it saw.
"""

from __future__ import annotations

import asyncio
import signal
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from rich.console import Console, Group
from rich.live import Live

from connector.broker import EmbeddedBroker
from connector.config import load_settings
from connector.control import ControlView, read_control
from connector.coordinator import read_manifests
from connector.fleet import WorkerProcess, write_config
from connector.messages import Manifest
from connector.status import (
    map_table,
    members_rows,
    members_table,
    rpo_seconds,
    sets_rows,
    sets_table,
)
from connector.verify import render, verify

TOPICS = {"orders": 6, "payments": 6}
GROUP = "tandem-demo"


def produce(
    bootstrap: str,
    seconds: float,
    rate: int,
    counts: Counter[tuple[str, int]],
    stop: threading.Event,
) -> None:
    """Steady producers, one per topic, keyed so partitions fill unevenly like real data."""
    lock = threading.Lock()

    def one(topic: str) -> None:
        p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})

        def delivered(err: object, msg: object) -> None:
            if err is None:
                with lock:
                    counts[(msg.topic(), msg.partition())] += 1  # type: ignore[attr-defined]

        per_tick = max(1, rate // len(TOPICS) // 10)
        i = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end and not stop.is_set():
            for _ in range(per_tick):
                key = f"customer-{i % 97}".encode()
                p.produce(
                    topic, key=key, value=f"{topic} update {i}".encode() * 8, on_delivery=delivered
                )
                i += 1
            p.poll(0)
            time.sleep(0.1)
        p.flush(30)

    threads = [threading.Thread(target=one, args=(t,)) for t in TOPICS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def covered(manifests: dict[int, Manifest], counts: Counter[tuple[str, int]]) -> bool:
    """Every produced update lies below the cuts of the last committed set."""
    if not manifests:
        return False
    last = manifests[max(manifests)]
    seqs = {(p.topic, p.partition): p.last_seq + 1 for p in last.portions}
    return all(seqs.get(tp, 0) >= n for tp, n in counts.items())


def _interrupt_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the demo never leaves workers or a broker behind."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def run_demo(seconds: float = 30, rate: int = 2000, workers: int = 3) -> int:
    _interrupt_on_sigterm()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="tandem-demo-") as tmp, EmbeddedBroker() as broker:
        work = Path(tmp)
        console.print(f"[bold]embedded broker[/bold] at {broker.bootstrap}")
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        for fut in admin.create_topics(
            [NewTopic(t, n) for t, n in TOPICS.items()], operation_timeout=15
        ).values():
            fut.result(15)
        console.print(
            f"primary topics: {', '.join(f'{t} ({n} partitions)' for t, n in TOPICS.items())}"
        )
        config = write_config(
            work / "tandem.yaml",
            {
                "group": GROUP,
                "source": {
                    "bootstrap_servers": broker.bootstrap,
                    "topics": list(TOPICS),
                    "session_timeout_ms": 6000,
                },
                "backup": {"topic_prefix": "backup."},
                "window": {"interval_s": 5, "grace_s": 1},
            },
        )
        fleet = [WorkerProcess(f"worker-{i + 1}", config, work).start() for i in range(workers)]
        console.print(f"started {workers} workers: {', '.join(w.name for w in fleet)}")
        counts: Counter[tuple[str, int]] = Counter()
        stop = threading.Event()
        producer = threading.Thread(
            target=produce, args=(broker.bootstrap, seconds, rate, counts, stop)
        )
        producer.start()
        client = {"bootstrap_servers": broker.bootstrap}
        rpo: list[float] = []
        manifests: dict[int, Manifest] = {}
        view = ControlView()
        ok = False
        deadline = time.monotonic() + seconds + 120
        try:
            with Live(console=console, refresh_per_second=2) as live:
                while time.monotonic() < deadline:
                    time.sleep(1)
                    view = asyncio.run(read_control(client, f"{GROUP}.control"))
                    manifests = asyncio.run(read_manifests(client, f"{GROUP}.sets"))
                    last = manifests[max(manifests)] if manifests else None
                    if producer.is_alive() and last is not None:
                        rpo.append(rpo_seconds(last) or 0.0)
                    live.update(
                        Group(
                            members_table(members_rows(view, 15_000), title="members (live)"),
                            sets_table(sets_rows(manifests)[-5:], title="last committed sets"),
                            f"produced {sum(counts.values())}   last set "
                            f"{last.set_id if last else '-'}   RPO {rpo_seconds(last)} s",
                        )
                    )
                    dead = [w.name for w in fleet if not w.alive]
                    if dead:
                        console.print(f"[red]worker(s) exited: {', '.join(dead)}[/red]")
                        break
                    if not producer.is_alive() and covered(manifests, counts):
                        ok = True
                        break
            stop.set()
            producer.join()
            console.print(map_table(view))
            console.print(members_table(members_rows(view, 15_000), title="per worker"))
            total = sum(counts.values())
            if not ok:
                console.print(
                    f"[red]not every update of {total} reached a committed set in time[/red]"
                )
                for w in fleet:
                    console.print(f"--- {w.name} log ---\n{w.log_tail()}")
                return 1
            console.print(
                f"all {total} produced updates are in committed sets "
                f"0..{max(manifests)}; running verify"
            )
            result = asyncio.run(verify(load_settings(config), all_sets=True))
            render(result, console)
            if rpo:
                q = statistics.quantiles(rpo, n=100) if len(rpo) > 1 else [rpo[0]] * 99
                console.print(
                    f"RPO at steady load over {len(rpo)} samples: p50 {q[49]:.2f} s, "
                    f"p99 {q[98]:.2f} s (interval 5 s + grace 1 s)"
                )
            return 0 if result.ok else 1
        finally:
            for w in fleet:
                w.terminate()
