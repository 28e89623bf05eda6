"""RPO at steady load, then failover after SIGKILL, then a join: one fleet, one broker.

Everything is read from outside: manifests for the RPO, ``/readyz`` for when a rebalance
starts, the control topic for maps and handovers, the mirror topic (``connector.timeline``)
for when a portion numbers new updates again, and the workers' own log line
"takeover of N portions ... took X ms" as a cross-check.
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.common import (
    SLOTS,
    control,
    covered,
    create_topics,
    manifests,
    members,
    stop_fleet,
    wait_for,
    worker_config,
)
from bench.probe import ReadyProbe, free_port
from connector.broker import EmbeddedBroker
from connector.config import load_settings
from connector.fleet import SteadyProducer, WorkerProcess
from connector.messages import Handover
from connector.status import rpo_seconds
from connector.timeline import Timeline, read_timeline
from connector.verify import verify

TOPICS = {"orders": 6, "payments": 6}
TAKEOVER = re.compile(
    r"^(\S+ \S+) INFO connector.worker: takeover of (\d+) portions \((\d+) orphaned\) "
    r"took (\d+) ms"
)


def takeovers(w: WorkerProcess, after_ms: int) -> list[dict[str, Any]]:
    """The worker's own account of its takeovers after a moment."""
    out = []
    for line in w.log_path.read_text(errors="replace").splitlines():
        m = TAKEOVER.match(line)
        if not m:
            continue
        at = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() * 1000
        if at > after_ms:
            out.append(
                {"worker": w.name, "portions": int(m[2]), "orphaned": int(m[3]), "ms": int(m[4])}
            )
    return out


def quantiles(xs: list[float]) -> dict[str, float]:
    q = statistics.quantiles(xs, n=100, method="inclusive")
    return {"p50": q[49], "p90": q[89], "p99": q[98], "max": max(xs), "n": len(xs)}


def failover(
    t: Timeline,
    probe: ReadyProbe,
    before: Any,
    victim: str,
    rest: set[str],
    killed: int,
    logs: list[dict[str, Any]],
) -> dict[str, Any]:
    at, _ = t.first_map_after(killed, rest)
    revoked = probe.first(killed, rest, "rebalancing") or at
    orphans = [(p.topic, p.partition) for p in before.portions if p.owner == victim]
    resumed = [t.resumed(p, killed) for p in orphans]
    back = max(r.at_ms for r in resumed if r is not None)
    protected = t.protected_at(at)
    return {
        "victim": victim,
        "orphaned_portions": len(orphans),
        "all_resumed": all(resumed),
        "session_expiry_s": (revoked - killed) / 1000,
        "broker_rebalance_s": (at - revoked) / 1000,
        "tandem_s": (back - at) / 1000,
        "total_s": (back - killed) / 1000,
        "redundancy_restored_s": (protected - killed) / 1000 if protected else None,
        "redundancy_after_map_s": (protected - at) / 1000 if protected else None,
        "takeover_logs": logs,
    }


def join(
    t: Timeline,
    probe: ReadyProbe,
    before: Any,
    everyone: set[str],
    started: int,
    handovers: list[Handover],
    committed: dict[int, int],
) -> dict[str, Any]:
    at, after = t.first_map_after(started, everyone)
    old = {m.name for m in before.members}
    revoked = probe.first(started, old, "rebalancing") or at
    h = next((h for h in handovers if h.at_ms > started), None)
    stayed: list[float] = []
    moved: list[float] = []
    own: dict[bool, list[float]] = {True: [], False: []}
    for p in after.portions:
        portion = (p.topic, p.partition)
        was = before.portion(*portion)
        mv = was is not None and was.owner != p.owner
        (moved if mv else stayed).append(t.gaps(portion, started, at + 5000))
        r = t.resumed(portion, at)
        if r is not None:
            own[mv].append((r.at_ms - at) / 1000)
    return {
        "moved_portions": len(moved),
        "handover_after_s": (h.at_ms - started) / 1000 if h else None,
        "boundary_set": h.set_id if h else None,
        "boundary_committed_after_s": (committed[h.set_id] - started) / 1000
        if h and h.set_id in committed
        else None,
        "map_after_s": (at - started) / 1000,
        "broker_rebalance_s": (at - revoked) / 1000,
        "pause_stayed_s": max(stayed, default=0.0),
        "pause_moved_s": max(moved, default=0.0),
        "tandem_stayed_s": max(own[False], default=0.0),
        "tandem_moved_s": max(own[True], default=0.0),
    }


def measure(work: Path, quick: bool, check: bool = True) -> dict[str, Any]:
    interval, grace = (2.0, 0.5) if quick else (5.0, 1.0)
    rpo_seconds_run = 30 if quick else 120
    rate = 2000
    with EmbeddedBroker() as broker:
        bs = broker.bootstrap
        group = "memb"
        create_topics(bs, TOPICS)
        config = worker_config(
            work, bs, group, list(TOPICS), window={"interval_s": interval, "grace_s": grace}
        )
        probe = ReadyProbe()

        def start(name: str) -> WorkerProcess:
            probe.ports[name] = free_port()
            env = {"TANDEM_HTTP__LISTEN": f"127.0.0.1:{probe.ports[name]}"}
            return WorkerProcess(name, config, work, env=env).start()

        fleet = [start(f"w{i}") for i in range(3)]
        probe.start()
        producer = SteadyProducer(bs, list(TOPICS), rate=rate, value_size=1024).start()
        try:
            wait_for(lambda: members(bs, group) == {"w0", "w1", "w2"}, 90, "a map", fleet)
            wait_for(lambda: len(manifests(bs, group)) >= 3, 90, "sets committing", fleet)
            rpo: list[tuple[float, float]] = []
            end = time.monotonic() + rpo_seconds_run
            while time.monotonic() < end:
                ms = manifests(bs, group)
                now = int(time.time() * 1000)
                rpo.append((now / 1000, rpo_seconds(ms[max(ms)], now) or 0.0))
                time.sleep(0.25)

            before = control(bs, group).latest_map
            assert before is not None
            victim = next(w for w in fleet if w.name != before.coordinator)
            rest = {w.name for w in fleet} - {victim.name}
            killed = int(time.time() * 1000)
            victim.kill()
            wait_for(lambda: members(bs, group) == rest, 90, "failover", fleet)
            time.sleep(interval + grace + 3)  # sets commit under the new map; redundancy back
            fail_logs = [x for w in fleet if w.alive for x in takeovers(w, killed)]

            before_join = control(bs, group).latest_map
            assert before_join is not None
            joined = int(time.time() * 1000)
            fleet.append(start("w3"))
            everyone = rest | {"w3"}
            wait_for(lambda: members(bs, group) == everyone, 120, "the join", fleet)
            time.sleep(interval + 5)
            join_logs = [x for w in fleet if w.alive for x in takeovers(w, joined)]

            counts = producer.stop()
            wait_for(
                lambda: covered(max(manifests(bs, group).items())[1], counts),
                120,
                "sets covering every update",
                fleet,
            )
        finally:
            producer.stop()
            probe.stop()
            stop_fleet(fleet)
        t = asyncio.run(read_timeline({"bootstrap_servers": bs}, group, SLOTS))
        view = control(bs, group)
        handovers = sorted(
            (m for m in view.others if isinstance(m, Handover)), key=lambda h: h.at_ms
        )
        committed = {i: m.committed_ms for i, m in manifests(bs, group).items()}
        verified = None
        if check:
            verified = bool(
                asyncio.run(verify(load_settings(config), all_sets=True, timeout_s=300)).ok
            )
    t0 = rpo[0][0]
    return {
        "interval_s": interval,
        "grace_s": grace,
        "rate": rate,
        "record_bytes": 1024,
        "rpo": quantiles([r for _, r in rpo]),
        "rpo_series": [(round(a - t0, 2), r) for a, r in rpo],
        "rpo_target_s": interval + grace + 1,
        "failover": failover(t, probe, before, victim.name, rest, killed, fail_logs),
        "join": {
            **join(t, probe, before_join, everyone, joined, handovers, committed),
            "takeover_logs": join_logs,
        },
        "reused_seqs": len(t.reused),
        "produced": sum(counts.values()),
        "producer_failed": producer.failed,
        "verified": verified,
        "readiness": probe.changes,
    }
