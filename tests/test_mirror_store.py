"""The mirror store's memory bound, on a real broker: beyond it, copies are kept by position."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from confluent_kafka import Producer

from connector.messages import MirroredRecord, MirrorEnvelope
from connector.mirror import MirrorStore

PORTION = ("orders", 3)


def envelope(first: int, n: int, mirror: str = "m") -> MirrorEnvelope:
    records = [
        MirroredRecord(offset=100 + s, seq=s, timestamp=1_000 + s, value=f"v{s}".encode())
        for s in range(first, first + n)
    ]
    return MirrorEnvelope(
        group="g",
        owner="o",
        mirror=mirror,
        epoch=1,
        topic=PORTION[0],
        partition=PORTION[1],
        first_seq=first,
        last_seq=first + n - 1,
        records=records,
    )


async def until(done: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not done():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def test_copies_beyond_the_bound_are_read_back_for_a_takeover(
    bootstrap: str, unique: str, make_topics
) -> None:
    topic = f"mirror-{unique}"
    make_topics(bootstrap, {topic: 2})
    p = Producer({"bootstrap.servers": bootstrap})
    for first in range(0, 100, 10):  # ten envelopes of ten copies each, to slot 1
        env = envelope(first, 10)
        p.produce(topic, env.encode(), b"orders:3", partition=1, headers=env.headers())
    assert p.flush(15) == 0

    store = MirrorStore(
        {"bootstrap_servers": bootstrap}, topic=topic, member="m", memory_records=25
    )
    task = asyncio.create_task(store.run(1))
    try:
        await until(lambda: store.held() == 100)
        assert store.in_memory() <= 25
        store.drop_through(PORTION, 44)  # a manifest secured 0..44, partly in a spilled envelope
        assert store.held() == 55
        with pytest.raises(RuntimeError, match="recall"):
            store.take(PORTION)
        await store.recall(PORTION)
        copies = store.take(PORTION)
    finally:
        task.cancel()
    assert [c.seq for c in copies] == list(range(45, 100))
    assert copies[-1].value == b"v99"
