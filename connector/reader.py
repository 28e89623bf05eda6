"""Reading internal and backup topics to their end.

"The end" is the high watermark a fetch response reports, not ListOffsets "latest": some
Kafka-protocol brokers answer the latter wrongly (docs/broker-notes.md), while every broker
returns the high watermark with each fetch. Used by recovery, the coordinator, status,
verify and restore: every reader that needs "everything there is, up to now".
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from connector.errors import BrokerUnavailable, TopicError


@contextlib.asynccontextmanager
async def standalone_consumer(
    client: dict[str, Any], *, read_committed: bool = True, **extra: Any
) -> AsyncIterator[AIOKafkaConsumer]:
    """A consumer outside any group: it assigns partitions itself and commits nothing."""
    extra.setdefault("fetch_max_wait_ms", 100)  # reads to the end: don't idle at each partition
    consumer = AIOKafkaConsumer(
        **client,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed" if read_committed else "read_uncommitted",
        **extra,
    )
    try:
        await consumer.start()
    except Exception as exc:
        await consumer.stop()
        raise BrokerUnavailable(
            f"cannot reach Kafka at {client.get('bootstrap_servers')}: {exc}"
        ) from exc
    try:
        yield consumer
    finally:
        # aiokafka's stop() raises CancelledError if its background task has not run yet
        # (a consumer stopped right after start, having read nothing): let it start first.
        await asyncio.sleep(0)
        await consumer.stop()


async def read_until_end(
    consumer: AIOKafkaConsumer,
    partitions: Iterable[TopicPartition],
    *,
    start: dict[TopicPartition, int] | None = None,
    timeout_s: float = 30.0,
    max_records: int = 10_000,
) -> AsyncIterator[tuple[TopicPartition, list[ConsumerRecord[bytes, bytes]]]]:
    """Yield batches until every partition's position reached its end as fetched now.

    The end is the last stable offset where the broker reports one (an open transaction
    is not "there" yet), else the high watermark.
    """
    tps = list(partitions)
    # Assigning a topic that does not exist would make some brokers create it with a
    # default shape; listing all topics never does.
    existing = await consumer.topics()
    missing = sorted({tp.topic for tp in tps} - existing)
    if missing:
        raise TopicError(f"topic(s) {', '.join(missing)} do not exist")
    consumer.assign(tps)
    for tp in tps:
        if start and tp in start:
            consumer.seek(tp, start[tp])
        else:
            await consumer.seek_to_beginning(tp)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    pending = set(tps)
    while pending:
        if loop.time() > deadline:
            names = ", ".join(sorted(f"{tp.topic}[{tp.partition}]" for tp in pending))
            raise BrokerUnavailable(f"could not read to the end of {names} in {timeout_s:.0f} s")
        batch = await consumer.getmany(*pending, timeout_ms=200, max_records=max_records)
        for tp, records in batch.items():
            if records:
                yield tp, records
        for tp in list(pending):
            ends = [
                e
                for e in (consumer.highwater(tp), consumer.last_stable_offset(tp))
                if e is not None
            ]
            if ends and await consumer.position(tp) >= min(ends):
                pending.discard(tp)


async def partition_ends(
    consumer: AIOKafkaConsumer, partitions: Iterable[TopicPartition], *, timeout_s: float = 30.0
) -> dict[TopicPartition, tuple[int, int]]:
    """``(earliest, end)`` of each partition, the end being the high watermark of a fetch.

    One fetch per partition is enough: every fetch response carries the high watermark,
    even an empty one, so nothing is read to the end to learn where it is.
    """
    tps = list(partitions)
    missing = sorted({tp.topic for tp in tps} - await consumer.topics())
    if missing:
        raise TopicError(f"topic(s) {', '.join(missing)} do not exist")
    consumer.assign(tps)
    earliest = await consumer.beginning_offsets(tps)
    for tp in tps:
        consumer.seek(tp, earliest[tp])
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    unknown = set(tps)
    while unknown:
        if loop.time() > deadline:
            names = ", ".join(sorted(f"{tp.topic}[{tp.partition}]" for tp in unknown))
            raise BrokerUnavailable(f"no fetch response for {names} in {timeout_s:.0f} s")
        await consumer.getmany(*unknown, timeout_ms=200, max_records=1)
        unknown = {tp for tp in unknown if consumer.highwater(tp) is None}
    return {tp: (earliest[tp], consumer.highwater(tp)) for tp in tps}
