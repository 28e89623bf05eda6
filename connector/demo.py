"""``tandem demo``: the whole story on one machine, ending by itself in about a minute.

It starts the embedded broker, creates two primary topics, runs steady producers and three
real worker processes; a fourth worker joins (at a set boundary), then one is killed with
SIGKILL and its portions fail over to their mirrors. Throughout, the members and the
consistent sets are shown live from the outside (control and sets topics). At the end it
verifies the backup against the primary and sums up: sets, RPO, failover time, join pause,
records lost and duplicated, all measured from the topics rather than the workers.
"""

from __future__ import annotations

import asyncio
import signal
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from confluent_kafka.admin import AdminClient, NewTopic
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from connector.broker import EmbeddedBroker
from connector.config import load_settings
from connector.control import ControlView, read_control
from connector.coordinator import read_manifests
from connector.fleet import SteadyProducer, WorkerProcess, write_config
from connector.messages import Manifest
from connector.status import (
    map_table,
    members_rows,
    members_table,
    rpo_seconds,
    sets_rows,
    sets_table,
)
from connector.timeline import Timeline, read_timeline
from connector.verify import VerifyResult, render, verify

TOPICS = {"orders": 6, "payments": 6}
GROUP = "tandem-demo"


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


def run_demo(seconds: float = 60, rate: int = 2000, workers: int = 3) -> int:
    _interrupt_on_sigterm()
    console = Console()
    join_at, kill_at = seconds * 0.3, seconds * 0.6
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
        producer = SteadyProducer(broker.bootstrap, list(TOPICS), rate=rate, value_size=200)
        producer.start()
        started = time.monotonic()
        client = {"bootstrap_servers": broker.bootstrap}
        rpo: list[float] = []
        manifests: dict[int, Manifest] = {}
        view = ControlView()
        story: list[tuple[float, str]] = []
        joined_ms = killed_ms = 0
        victim = ""
        counts: Counter[tuple[str, int]] = Counter()
        ok = False
        deadline = started + seconds + 120
        try:
            with Live(console=console, refresh_per_second=2) as live:
                while time.monotonic() < deadline:
                    time.sleep(1)
                    elapsed = time.monotonic() - started
                    if not joined_ms and elapsed >= join_at:
                        joined_ms = int(time.time() * 1000)
                        fleet.append(
                            WorkerProcess(f"worker-{len(fleet) + 1}", config, work).start()
                        )
                        story.append((elapsed, f"{fleet[-1].name} starts and asks to join"))
                    if not killed_ms and elapsed >= kill_at:
                        m = view.latest_map
                        coordinator = m.coordinator if m else ""
                        target = next(w for w in fleet if w.alive and w.name != coordinator)
                        victim = target.name
                        killed_ms = int(time.time() * 1000)
                        target.kill()
                        story.append((elapsed, f"{victim} killed with SIGKILL"))
                    if producer.running and elapsed >= seconds:
                        counts = producer.stop()
                        story.append((elapsed, f"producers stop after {sum(counts.values())}"))
                    view = asyncio.run(read_control(client, f"{GROUP}.control"))
                    manifests = asyncio.run(read_manifests(client, f"{GROUP}.sets"))
                    last = manifests[max(manifests)] if manifests else None
                    if producer.running and last is not None:
                        rpo.append(rpo_seconds(last) or 0.0)
                    live.update(
                        Group(
                            members_table(members_rows(view, 15_000), title="members (live)"),
                            sets_table(sets_rows(manifests)[-5:], title="last committed sets"),
                            f"t={elapsed:4.0f}s  produced {sum(producer.counts.values())}   "
                            f"last set {last.set_id if last else '-'}   "
                            f"RPO {rpo_seconds(last)} s",
                            *(f"[bold]{t:4.0f}s[/bold] {what}" for t, what in story),
                        )
                    )
                    crashed = [w.name for w in fleet if not w.alive and w.name != victim]
                    if crashed:
                        console.print(f"[red]worker(s) exited: {', '.join(crashed)}[/red]")
                        break
                    if not producer.running and counts and covered(manifests, counts):
                        ok = True
                        break
            counts = producer.stop()
            console.print(map_table(view))
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
            timeline = asyncio.run(read_timeline(client, GROUP, 32))
            console.print(
                summary(manifests, rpo, timeline, joined_ms, killed_ms, victim, result, total)
            )
            return 0 if result.ok and not timeline.reused else 1
        finally:
            producer.stop()
            for w in fleet:
                w.terminate()


def summary(
    manifests: dict[int, Manifest],
    rpo: list[float],
    timeline: Timeline,
    joined_ms: int,
    killed_ms: int,
    victim: str,
    result: VerifyResult,
    total: int,
) -> Table:
    """The figures of the run, each measured from the topics."""
    table = Table(title="summary (measured from the topics, not from the workers)")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("committed sets", str(len(manifests)))
    if rpo:
        q = statistics.quantiles(rpo, n=100) if len(rpo) > 1 else [rpo[0]] * 99
        table.add_row(
            "RPO p50 / p99 (interval 5 s + grace 1 s; p99 spans the failover)",
            f"{q[49]:.1f} s / {q[98]:.1f} s",
        )
    before = timeline.map_at(killed_ms)
    if before is not None:
        moved = [(p.topic, p.partition) for p in before.portions if p.owner == victim]
        resumed = [timeline.resumed(p, killed_ms) for p in moved]
        if moved and all(resumed):
            last = max(r.at_ms for r in resumed if r)
            table.add_row(
                f"failover of {victim}'s {len(moved)} portions (kill to moving again)",
                f"{(last - killed_ms) / 1000:.1f} s",
            )
        restored = timeline.protected_at(killed_ms)
        if restored is not None:
            table.add_row(
                "redundancy restored after the kill", f"{(restored - killed_ms) / 1000:.1f} s"
            )
    try:
        at, after = timeline.first_map_after(joined_ms)
        stayed = max(
            (timeline.gaps((p.topic, p.partition), joined_ms, at + 5000) for p in after.portions),
            default=0.0,
        )
        table.add_row("longest pause of a portion during the join", f"{stayed:.1f} s")
    except LookupError:
        pass
    kinds = result.kinds()
    table.add_row(
        "records produced / verified in the backup", f"{total} / {result.records_checked}"
    )
    table.add_row("records lost", str(kinds.get("missing", 0)))
    table.add_row("records duplicated", str(kinds.get("duplicate", 0)))
    table.add_row("sequence numbers reused", str(len(timeline.reused)))
    return table
