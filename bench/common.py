"""What every scenario needs: a broker, topics, a fleet of workers, and outside views.

Each scenario gets its own embedded broker (Tansu is in-memory and starts in
milliseconds), so one scenario's data never slows another down; competitors inside a
scenario share one broker and run one after the other, and only their ratio is reported.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psutil
from aiokafka import TopicPartition
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from connector.control import ControlView, read_control
from connector.coordinator import read_manifests
from connector.errors import MalformedMessage, TandemError
from connector.fleet import WorkerProcess, write_config
from connector.messages import Manifest, PortionMap, decode_control
from connector.reader import read_until_end, standalone_consumer

Portion = tuple[str, int]
SLOTS = 8


def create_topics(bootstrap: str, topics: dict[str, int]) -> None:
    """Create and wait: producing first would auto-create a topic with 4 partitions."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(t, n) for t, n in topics.items()], operation_timeout=15)
    for fut in futures.values():
        fut.result(15)


def prefill(bootstrap: str, topic: str, partitions: int, n: int, size: int) -> Counter[Portion]:
    """n records of ``size`` bytes spread evenly over the partitions, all acknowledged."""
    counts: Counter[Portion] = Counter()
    failed: list[str] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is None:
            counts[(msg.topic(), msg.partition())] += 1
        else:
            failed.append(str(err))

    p = Producer(
        {"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 20, "batch.size": 1 << 20}
    )
    body = bytes(range(256)) * (size // 256 + 1)
    for i in range(n):
        value = f"{i:012d}".encode() + body[: size - 12]
        while True:
            try:
                p.produce(
                    topic,
                    value=value,
                    key=f"k{i % 997}".encode(),
                    partition=i % partitions,
                    on_delivery=delivered,
                )
                break
            except BufferError:
                p.poll(0.05)
        if i % 5000 == 0:
            p.poll(0)
    if p.flush(120) or failed:
        raise TandemError(f"prefill of {topic} failed: {failed[:3]}")
    return counts


def worker_config(work: Path, bootstrap: str, group: str, topics: list[str], **extra: Any) -> Path:
    """A worker config for the benchmarks; ``extra`` replaces whole top-level sections."""
    config: dict[str, Any] = {
        "group": group,
        "source": {"bootstrap_servers": bootstrap, "topics": topics, "session_timeout_ms": 6000},
        "backup": {"topic_prefix": f"{group}-backup."},
        "window": {"interval_s": 2, "grace_s": 0.5},
        "mirror": {"max_workers": SLOTS},
        "announce_interval_s": 0.5,
    }
    config.update(extra)
    return write_config(work / f"{group}.yaml", config)


def manifests(bootstrap: str, group: str) -> dict[int, Manifest]:
    try:
        return asyncio.run(read_manifests({"bootstrap_servers": bootstrap}, f"{group}.sets"))
    except TandemError:
        return {}


def control(bootstrap: str, group: str) -> ControlView:
    try:
        return asyncio.run(read_control({"bootstrap_servers": bootstrap}, f"{group}.control"))
    except TandemError:
        return ControlView()


def map_times(bootstrap: str, group: str) -> list[tuple[int, PortionMap]]:
    """Every map published on the control topic, with its record time (ms), in order."""

    async def read() -> list[tuple[int, PortionMap]]:
        out = []
        async with standalone_consumer({"bootstrap_servers": bootstrap}) as consumer:
            tps = [TopicPartition(f"{group}.control", 0)]
            async for _tp, records in read_until_end(consumer, tps):
                for r in records:
                    try:
                        msg = decode_control(r.value, list(r.headers))
                    except MalformedMessage:
                        continue
                    if isinstance(msg, PortionMap):
                        out.append((r.timestamp, msg))
        return out

    return asyncio.run(read())


def members(bootstrap: str, group: str) -> set[str]:
    m = control(bootstrap, group).latest_map
    return {mm.name for mm in m.members} if m else set()


def covered(last: Manifest | None, counts: Counter[Portion]) -> bool:
    """Every counted update lies below the cuts of this manifest."""
    if last is None:
        return False
    have = {(p.topic, p.partition): p.last_seq + 1 for p in last.portions}
    return all(have.get(tp, 0) >= n for tp, n in counts.items())


def wait_for(
    predicate: Callable[[], bool],
    timeout_s: float,
    what: str,
    fleet: Iterable[WorkerProcess] = (),
    every_s: float = 0.25,
) -> float:
    """Poll until true; returns the wall time (s) it became true. Fails with worker logs."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return time.time()
        time.sleep(every_s)
    logs = "\n".join(f"--- {w.name} ---\n{w.log_tail(30)}" for w in fleet)
    raise TandemError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{logs}")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU of a live process (its threads included)."""
    if pid is None:
        return 0.0
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def rss_bytes(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def stop_fleet(fleet: Iterable[WorkerProcess]) -> None:
    """Kill rather than leave gracefully: a benchmark's end needs no handover."""
    for w in fleet:
        w.kill()
