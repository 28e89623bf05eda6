"""The one adapter around confluent-kafka's blocking clients.

confluent-kafka is used where aiokafka falls short (transactions, admin), but its calls block.
Every blocking call runs on the adapter's own single-thread executor; delivery callbacks run
on a poll thread and resolve asyncio futures with ``call_soon_threadsafe``. Nothing here is
called from the event loop directly, and ``close()`` shuts both threads down.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

from connector.errors import BrokerUnavailable, Fenced, TandemError, TopicError

log = logging.getLogger(__name__)
T = TypeVar("T")

Headers = Sequence[tuple[str, bytes | None]]


@dataclass(frozen=True, slots=True)
class Outgoing:
    topic: str
    value: bytes | None
    key: bytes | None = None
    partition: int = -1
    headers: Headers = ()
    timestamp: int = 0


@dataclass(frozen=True, slots=True)
class TopicSpec:
    name: str
    partitions: int
    config: tuple[tuple[str, str], ...] = ()


class _Blocking:
    """Owns the executor every blocking call of one client goes through."""

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


class Admin(_Blocking):
    def __init__(self, conf: dict[str, Any], timeout_s: float = 15.0) -> None:
        super().__init__("tandem-admin")
        self._client = AdminClient(conf)
        self._timeout = timeout_s
        self._where = conf.get("bootstrap.servers", "?")

    async def partition_counts(self) -> dict[str, int]:
        """All topics and their partition counts; listing all never auto-creates a topic."""

        def run() -> dict[str, int]:
            try:
                md = self._client.list_topics(timeout=self._timeout)
            except KafkaException as exc:
                raise BrokerUnavailable(
                    f"cannot reach Kafka at {self._where} within {self._timeout:.0f} s: {exc}"
                ) from exc
            return {name: len(t.partitions) for name, t in md.topics.items() if t.error is None}

        return await self._call(run)

    async def ensure_topics(self, specs: Sequence[TopicSpec], grow: bool = False) -> list[str]:
        """Create missing topics and check the shape of existing ones; returns those created.

        With ``grow``, an existing topic with fewer partitions than its spec gets more
        (a backup topic follows its primary when partitions are added there).
        """
        existing = await self.partition_counts()
        short = {}
        for spec in specs:
            have = existing.get(spec.name)
            if have is not None and have < spec.partitions and grow:
                short[spec.name] = spec.partitions
            elif have is not None and have != spec.partitions:
                raise TopicError(
                    f"topic {spec.name} has {have} partitions, Tandem needs {spec.partitions}; "
                    "delete it or use another group name"
                )
        if short:
            await self._grow(short)
        missing = [s for s in specs if s.name not in existing]
        if not missing:
            return []

        def run() -> None:
            futures = self._client.create_topics(
                [NewTopic(s.name, s.partitions, config=dict(s.config)) for s in missing],
                operation_timeout=self._timeout,
                request_timeout=self._timeout,
            )
            for name, fut in futures.items():
                try:
                    fut.result(timeout=self._timeout)
                except KafkaException as exc:
                    if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                        raise TopicError(f"cannot create topic {name}: {exc}") from exc

        await self._call(run)
        after = await self.partition_counts()
        for spec in missing:
            if after.get(spec.name) != spec.partitions:
                raise TopicError(
                    f"topic {spec.name} was created with {after.get(spec.name)} partitions, "
                    f"not {spec.partitions}"
                )
        return [s.name for s in missing]

    async def _grow(self, counts: dict[str, int]) -> None:
        """Add partitions; another worker growing the same topic at once is not an error."""

        def run() -> dict[str, str]:
            futures = self._client.create_partitions(
                [NewPartitions(name, n) for name, n in sorted(counts.items())],
                operation_timeout=self._timeout,
                request_timeout=self._timeout,
            )
            failed = {}
            for name, fut in futures.items():
                try:
                    fut.result(timeout=self._timeout)
                except KafkaException as exc:
                    failed[name] = exc.args[0].str()
            return failed

        failed = await self._call(run)
        after = await self.partition_counts() if failed else {}
        for name, why in sorted(failed.items()):
            if after.get(name, 0) < counts[name]:
                raise TopicError(
                    f"cannot grow topic {name} to {counts[name]} partitions on {self._where}: {why}"
                )
        log.info("grew %s", ", ".join(f"{t} to {n} partitions" for t, n in counts.items()))

    async def commit_group_offsets(self, group: str, offsets: dict[tuple[str, int], int]) -> None:
        from confluent_kafka import ConsumerGroupTopicPartitions

        def run() -> None:
            tps = [TopicPartition(t, p, o) for (t, p), o in sorted(offsets.items())]
            futures = self._client.alter_consumer_group_offsets(
                [ConsumerGroupTopicPartitions(group, tps)], request_timeout=self._timeout
            )
            for fut in futures.values():
                fut.result(timeout=self._timeout)

        await self._call(run)

    async def group_offsets(
        self, group: str, partitions: Sequence[tuple[str, int]]
    ) -> dict[tuple[str, int], int]:
        from confluent_kafka import ConsumerGroupTopicPartitions

        def run() -> dict[tuple[str, int], int]:
            req = ConsumerGroupTopicPartitions(group, [TopicPartition(t, p) for t, p in partitions])
            futures = self._client.list_consumer_group_offsets([req], request_timeout=self._timeout)
            out: dict[tuple[str, int], int] = {}
            for fut in futures.values():
                for tp in fut.result(timeout=self._timeout).topic_partitions:
                    if tp.offset >= 0:
                        out[(tp.topic, tp.partition)] = tp.offset
            return out

        return await self._call(run)

    async def close(self) -> None:
        self._shutdown()


class AsyncProducer(_Blocking):
    """A confluent-kafka producer; ``send`` resolves with the record's (partition, offset).

    With a ``transactional_id`` it also exposes the transaction calls; a fenced producer
    raises Fenced, which the caller must treat as "stop writing, someone took over".
    """

    def __init__(self, conf: dict[str, Any], transactional_id: str | None = None) -> None:
        super().__init__("tandem-producer")
        conf = {
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "compression.type": "none",
            **conf,
        }
        if transactional_id:
            conf["transactional.id"] = transactional_id
        self._producer = Producer(conf)
        self._closing = threading.Event()
        self._poller = threading.Thread(target=self._poll_loop, name="tandem-poll", daemon=True)
        self._poller.start()

    def _poll_loop(self) -> None:
        while not self._closing.is_set():
            self._producer.poll(0.05)

    async def send_many(self, records: Sequence[Outgoing]) -> list[tuple[int, int]]:
        """Send records in order; resolves when all are acknowledged by the cluster.

        One future per call, not per record: delivery callbacks only fill a list, and the
        last one wakes the event loop once, so a large set costs the loop nothing per record.
        """
        if not records:
            return []
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        results: list[tuple[int, int]] = [(-1, -1)] * len(records)
        pending = len(records)
        lock = threading.Lock()

        def deliver(i: int) -> Callable[[Any, Any], None]:
            def cb(err: KafkaError | None, msg: Any) -> None:
                nonlocal pending
                if err is not None:
                    loop.call_soon_threadsafe(_set_exception, done, _wrap(err))
                    return
                results[i] = (msg.partition(), msg.offset())
                with lock:
                    pending -= 1
                    last = pending == 0
                if last:
                    loop.call_soon_threadsafe(_set_result, done, None)

            return cb

        def run() -> None:
            produce = self._producer.produce
            for i, rec in enumerate(records):
                while True:
                    try:
                        produce(
                            rec.topic,
                            value=rec.value,
                            key=rec.key,
                            partition=rec.partition,
                            headers=list(rec.headers) or None,
                            timestamp=rec.timestamp,
                            on_delivery=deliver(i),
                        )
                        break
                    except BufferError:
                        self._producer.poll(0.05)

        await self._call(run)
        await done
        return results

    async def send(self, record: Outgoing) -> tuple[int, int]:
        return (await self.send_many([record]))[0]

    async def init_transactions(self, timeout_s: float = 30.0) -> None:
        await self._txn(self._producer.init_transactions, timeout_s)

    async def begin(self) -> None:
        await self._txn(self._producer.begin_transaction)

    async def commit(self, timeout_s: float = 30.0) -> None:
        await self._txn(self._producer.commit_transaction, timeout_s)

    async def abort(self, timeout_s: float = 30.0) -> None:
        await self._txn(self._producer.abort_transaction, timeout_s)

    async def _txn(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            await self._call(fn, *args)
        except KafkaException as exc:
            raise _wrap(exc.args[0]) from exc

    async def flush(self, timeout_s: float = 30.0) -> int:
        return await self._call(self._producer.flush, timeout_s)

    async def close(self) -> None:
        try:
            await self.flush(10.0)
        finally:
            self._closing.set()
            await asyncio.get_running_loop().run_in_executor(None, self._poller.join)
            self._shutdown()


def _set_result(fut: asyncio.Future[T], value: T) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], exc: Exception) -> None:
    if not fut.done():
        fut.set_exception(exc)


def _wrap(err: KafkaError) -> TandemError:
    if err.code() in (
        KafkaError._FENCED,  # noqa: SLF001 - librdkafka local error codes start with _
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
    ):
        return Fenced(f"producer fenced: {err.str()}")
    exc = TandemError(f"kafka error: {err.str()}")
    exc.retriable = bool(err.retriable())
    return exc
