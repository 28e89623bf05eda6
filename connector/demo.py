"""``tandem demo``: the whole story on one machine, ending by itself.

It starts the embedded broker, creates two primary topics, runs producers and real worker
processes, and shows from the outside (the control topic) how the portions are owned,
numbered and mirrored, until every produced update is held twice.
"""

from __future__ import annotations

import asyncio
import signal
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
from connector.control import ControlView, read_control
from connector.fleet import WorkerProcess, write_config
from connector.status import map_table, members_rows, members_table

TOPICS = {"orders": 6, "payments": 6}
GROUP = "tandem-demo"


def produce(bootstrap: str, records: int, counts: Counter[tuple[str, int]]) -> None:
    """Two producers, one per topic, with keys so partitions fill unevenly like real data."""
    lock = threading.Lock()

    def one(topic: str, n: int) -> None:
        p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})

        def delivered(err: object, msg: object) -> None:
            if err is None:
                with lock:
                    counts[(msg.topic(), msg.partition())] += 1  # type: ignore[attr-defined]

        for i in range(n):
            key = f"customer-{i % 97}".encode()
            while True:
                try:
                    p.produce(
                        topic,
                        key=key,
                        value=f"{topic} update {i}".encode() * 8,
                        on_delivery=delivered,
                    )
                    break
                except BufferError:
                    p.poll(0.05)
            if i % 500 == 0:
                p.poll(0)
                time.sleep(0.01)
        p.flush(30)

    threads = [threading.Thread(target=one, args=(t, records // len(TOPICS))) for t in TOPICS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def caught_up(view: ControlView, counts: Counter[tuple[str, int]]) -> bool:
    m = view.latest_map
    if m is None:
        return False
    for p in m.portions:
        a = view.announcements.get(p.owner)
        owned = {(o.topic, o.partition): o for o in a.owned} if a else {}
        o = owned.get((p.topic, p.partition))
        want = counts[(p.topic, p.partition)]
        if o is None or o.next_seq != want:
            return False
        held = max((r.last_seq for r in o.mirrored_ranges), default=-1)
        if want and held != want - 1:
            return False
    return True


def _interrupt_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the demo never leaves workers or a broker behind."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def run_demo(records: int = 20_000, workers: int = 3) -> int:
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
        producer = threading.Thread(target=produce, args=(broker.bootstrap, records, counts))
        producer.start()
        client = {"bootstrap_servers": broker.bootstrap}
        control = f"{GROUP}.control"
        deadline = time.monotonic() + 180
        ok = False
        view = ControlView()
        try:
            with Live(console=console, refresh_per_second=2) as live:
                while time.monotonic() < deadline:
                    time.sleep(1)
                    view = asyncio.run(read_control(client, control))
                    live.update(
                        Group(members_table(members_rows(view, 15_000), title="members (live)"))
                    )
                    dead = [w.name for w in fleet if not w.alive]
                    if dead:
                        console.print(f"[red]worker(s) exited: {', '.join(dead)}[/red]")
                        break
                    if not producer.is_alive() and caught_up(view, counts):
                        ok = True
                        break
            producer.join()
            console.print(map_table(view))
            console.print(members_table(members_rows(view, 15_000), title="per worker"))
            total = sum(counts.values())
            if ok:
                console.print(
                    f"[green]all {total} produced updates are numbered and held by two "
                    f"workers[/green]"
                )
            else:
                console.print(
                    f"[red]not every update of {total} was numbered and mirrored in time[/red]"
                )
                for w in fleet:
                    console.print(f"--- {w.name} log ---\n{w.log_tail()}")
        finally:
            for w in fleet:
                w.terminate()
        return 0 if ok else 1
