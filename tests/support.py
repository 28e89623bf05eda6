"""Test helpers that look at the cluster from outside the workers."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition
from confluent_kafka import Producer

from connector.control import ControlView, read_control
from connector.coordinator import read_manifests
from connector.errors import TopicError
from connector.fleet import WorkerProcess, write_config
from connector.messages import Manifest
from connector.reader import read_until_end, standalone_consumer

Portion = tuple[str, int]


def produce(bootstrap: str, topic: str, n: int, prefix: str = "") -> Counter[Portion]:
    """Produce n keyed records and wait for every acknowledgement."""
    counts: Counter[Portion] = Counter()
    failures: list[str] = []

    def delivered(err: Any, msg: Any) -> None:
        if err is not None:
            failures.append(str(err))
        else:
            counts[(msg.topic(), msg.partition())] += 1

    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})
    for i in range(n):
        p.produce(
            topic,
            key=f"{prefix}k{i % 101}".encode(),
            value=f"{prefix}{topic}-{i}".encode(),
            headers=[("h", f"{i}".encode())],
            on_delivery=delivered,
        )
        if i % 1000 == 0:
            p.poll(0)
    assert p.flush(30) == 0
    assert not failures, failures
    return counts


async def read_all(bootstrap: str, topic: str, partitions: int) -> dict[int, list[Any]]:
    out: dict[int, list[Any]] = defaultdict(list)
    async with standalone_consumer({"bootstrap_servers": bootstrap}) as consumer:
        tps = [TopicPartition(topic, i) for i in range(partitions)]
        async for tp, records in read_until_end(consumer, tps, timeout_s=60):
            out[tp.partition].extend(records)
    return out


def wait_for(
    predicate: Callable[[], bool], timeout_s: float, what: str, fleet: list[WorkerProcess] = ()
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    logs = "\n".join(f"--- {w.name} ---\n{w.log_tail(40)}" for w in fleet)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{logs}")


def control(bootstrap: str, group: str) -> ControlView:
    """The group as published; empty while the group has not created its topics yet."""
    try:
        return asyncio.run(read_control({"bootstrap_servers": bootstrap}, f"{group}.control"))
    except TopicError:
        return ControlView()


def worker_config(tmp: Path, bootstrap: str, group: str, topics: list[str], **extra: Any) -> Path:
    config = {
        "group": group,
        "source": {"bootstrap_servers": bootstrap, "topics": topics, "session_timeout_ms": 6000},
        "backup": {"topic_prefix": f"{group}-backup."},
        "window": {"interval_s": 2, "grace_s": 0.5},
        "mirror": {"max_workers": 8},
        "announce_interval_s": 0.5,
    }
    config.update(extra)
    return write_config(tmp / f"{group}.yaml", config)


def manifests(bootstrap: str, group: str) -> dict[int, Manifest]:
    try:
        return asyncio.run(read_manifests({"bootstrap_servers": bootstrap}, f"{group}.sets"))
    except Exception:
        return {}


def covered(bootstrap: str, group: str, counts: Counter[tuple[str, int]]) -> bool:
    ms = manifests(bootstrap, group)
    if not ms:
        return False
    last = ms[max(ms)]
    have = {(p.topic, p.partition): p.last_seq + 1 for p in last.portions}
    return all(have.get(tp, 0) >= n for tp, n in counts.items())
