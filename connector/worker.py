"""A Tandem worker: one member of ``<group>``, owner of some portions, mirror of others.

It joins the group on the primary cluster (path 2) with the ``tandem`` assignor, so every
worker holds the whole portion map; it reads and numbers the portions it owns and mirrors
them through ``<group>.mirror`` on the backup cluster (path 1); it keeps the copies it is
sent. It announces itself on ``<group>.control`` so ``status`` and tests can see it from
outside.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Coroutine
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from connector.assignor import TandemAssignor
from connector.clients import Admin, AsyncProducer, Outgoing, TopicSpec
from connector.config import Settings
from connector.errors import TandemError, TopicError
from connector.messages import (
    HeldPortion,
    MemberAnnouncement,
    MemberMetadata,
    MirroredPortion,
    OwnedPortion,
    PortionMap,
)
from connector.mirror import MirrorSender, MirrorStore, read_copies
from connector.owner import Portion, PortionState

log = logging.getLogger(__name__)


def internal_topics(settings: Settings) -> list[TopicSpec]:
    """The group's own topics on the backup cluster and the shape each must have."""
    keep = (("retention.ms", "-1"),)
    return [
        TopicSpec(settings.mirror_topic, settings.mirror.max_workers, keep),
        TopicSpec(settings.control_topic, 1, keep),
        TopicSpec(settings.sets_topic, 1, keep),
    ]


async def primary_topics(admin: Admin, settings: Settings) -> dict[str, int]:
    """The primary topics to back up, checked without creating any of them."""
    counts = await admin.partition_counts()
    src = settings.source
    if src.topic_regex:
        pattern = re.compile(src.topic_regex)
        return {t: n for t, n in counts.items() if pattern.fullmatch(t)}
    missing = [t for t in src.topics if t not in counts]
    if missing:
        raise TopicError(
            f"primary topic(s) {', '.join(missing)} do not exist on {src.bootstrap_servers}"
        )
    return {t: counts[t] for t in src.topics}


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self._worker = worker

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._worker.on_revoked()

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        await self._worker.on_assigned(assigned)


class Worker:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.name = settings.member_id
        self.map: PortionMap | None = None
        self.slot = -1
        self.portions: dict[Portion, PortionState] = {}
        self.started_ms = int(time.time() * 1000)
        self._tasks: list[asyncio.Task[None]] = []
        self._store_task: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._closed = False
        self._consumer: AIOKafkaConsumer | None = None
        self._mirror_partitions = settings.mirror.max_workers
        backup = settings.backup_cluster
        self._backup_client = backup.aiokafka()
        self._admin = Admin(settings.source.confluent())
        self._backup_admin = Admin(backup.confluent())
        self._producer: AsyncProducer | None = None
        self.store = MirrorStore(self._backup_client, topic=settings.mirror_topic, member=self.name)
        self.sender: MirrorSender | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        topics = await primary_topics(self._admin, s)
        if not topics and not s.source.topic_regex:
            raise TopicError("no primary topics to back up")
        await self._backup_admin.ensure_topics(internal_topics(s))
        self._producer = AsyncProducer(s.backup_cluster.confluent())
        self.sender = MirrorSender(
            self._producer,
            topic=s.mirror_topic,
            group=s.group,
            member=self.name,
            batch_records=s.mirror.batch_records,
            batch_bytes=s.mirror.batch_bytes,
            max_unsent=s.mirror.batch_records * 20,
        )
        assignor = TandemAssignor(self._metadata, s.mirror.max_workers, self._on_map)
        session = s.source.session_timeout_ms
        self._consumer = AIOKafkaConsumer(
            **s.source.aiokafka(),
            group_id=s.group,
            client_id=f"tandem-{self.name}",
            partition_assignment_strategy=(assignor,),
            enable_auto_commit=False,
            auto_offset_reset=s.source.start_from,
            isolation_level="read_committed",
            session_timeout_ms=session,
            heartbeat_interval_ms=max(100, session // 5),
            rebalance_timeout_ms=max(30_000, session * 3),
            max_partition_fetch_bytes=4 * 1024 * 1024,
        )
        listener = _Listener(self)
        if s.source.topic_regex:
            self._consumer.subscribe(pattern=s.source.topic_regex, listener=listener)
        else:
            self._consumer.subscribe(topics=list(topics), listener=listener)
        await self._consumer.start()
        self._spawn(self.sender.run(), "mirror-sender")
        self._spawn(self._announce_loop(), "announcer")
        log.info("worker %s started: group %s, topics %s", self.name, s.group, sorted(topics))

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.append(task)

    def check_errors(self) -> None:
        """Surface a failed background task in the main loop instead of losing it."""
        for task in self._tasks + ([self._store_task] if self._store_task else []):
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise TandemError(f"{task.get_name()} failed: {task.exception()}") from (
                    task.exception()
                )

    async def run(self) -> None:
        """Read, number and mirror until close() is called."""
        assert self._consumer is not None and self.sender is not None
        while not self._closing.is_set():
            self.check_errors()
            batch = await self._consumer.getmany(timeout_ms=200, max_records=5000)
            for tp, records in batch.items():
                state = self.portions.get((tp.topic, tp.partition))
                if state is None:
                    continue
                taken = state.take(records)
                if taken and state.mirror is not None:
                    assert self.map is not None
                    self.sender.enqueue(
                        state.portion,
                        state.mirror,
                        self.map.slot_of(state.mirror),
                        self.map.epoch,
                        taken,
                    )
            await self.sender.wait_room()

    def stop(self) -> None:
        """Ask run() to return; close() then leaves the group."""
        self._closing.set()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        try:
            if self.sender is not None:
                await asyncio.wait_for(self.sender.drain(), 10)
            if self._producer is not None:
                await self._announce(leaving=True)
        except Exception as exc:
            log.warning("while closing: %r", exc)
        finally:
            if self._consumer is not None:
                await self._consumer.stop()
            for task in [*self._tasks, self._store_task]:
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            if self._producer is not None:
                await self._producer.close()
            await self._admin.close()
            await self._backup_admin.close()

    # -- membership ------------------------------------------------------------------------

    def _metadata(self) -> MemberMetadata:
        mirrored = []
        if self.map is not None:
            mirrored = [
                HeldPortion(topic=p.topic, partition=p.partition)
                for p in self.map.portions
                if p.mirror == self.name
            ]
        return MemberMetadata(
            name=self.name,
            slot=self.slot,
            epoch=self.map.epoch if self.map else 0,
            owned=[HeldPortion(topic=t, partition=p) for t, p in sorted(self.portions)],
            mirrored=mirrored,
            leaving=self._closing.is_set(),
        )

    def _on_map(self, new_map: PortionMap) -> None:
        self.map = new_map

    async def on_revoked(self) -> None:
        """Before the group moves anything, every update numbered so far reaches its mirror."""
        if self.sender is not None:
            await self.sender.drain()

    async def on_assigned(self, assigned: list[TopicPartition]) -> None:
        assert self._consumer is not None and self.sender is not None and self.map is not None
        new_map = self.map
        log.info(
            "map epoch %s: coordinator %s, %d members, %d portions owned here",
            new_map.epoch,
            new_map.coordinator,
            len(new_map.members),
            len(assigned),
        )
        try:
            slot = new_map.slot_of(self.name)
        except KeyError:
            log.error(
                "member %s is not in the map: another worker may use the same member id",
                self.name,
            )
            return
        if slot != self.slot:
            self.slot = slot
            if self._store_task is not None:
                self._store_task.cancel()
            self._store_task = asyncio.create_task(self.store.run(slot), name="mirror-store")

        mine = {(tp.topic, tp.partition) for tp in assigned}
        for portion in list(self.portions):
            if portion not in mine:
                del self.portions[portion]
                self.sender.forget(portion)
        new = sorted(mine - set(self.portions))
        if new:
            await self._take_over(new)
        for portion, state in self.portions.items():
            entry = new_map.portion(*portion)
            mirror = entry.mirror if entry else None
            if mirror != state.mirror:
                state.mirror = mirror
                if mirror is not None and state.unsecured:
                    # A new mirror gets every update not yet secured: two holders again.
                    self.sender.enqueue(
                        portion,
                        mirror,
                        new_map.slot_of(mirror),
                        new_map.epoch,
                        list(state.unsecured),
                    )
            self._consumer.seek(TopicPartition(*portion), state.next_offset)

    async def _take_over(self, portions: list[Portion]) -> None:
        """Continue newly owned portions exactly where their mirrored copies end.

        Without copies, a portion starts at the group's committed offset or, for a group
        that never committed, at the configured end of the topic. Offsets come from the
        admin client and ListOffsets: asking the group consumer for its position here, inside
        the rebalance callback, would wait on the very rebalance it is part of.
        """
        assert self._consumer is not None
        copies = await read_copies(
            self._backup_client, self.settings.mirror_topic, self._mirror_partitions, portions
        )
        committed = await self._admin.group_offsets(self.settings.group, portions)
        tps = [TopicPartition(*p) for p in portions]
        if self.settings.source.start_from == "earliest":
            ends = await self._consumer.beginning_offsets(tps)
        else:
            ends = await self._consumer.end_offsets(tps)
        for portion, tp in zip(portions, tps, strict=True):
            base = committed.get(portion, ends[tp])
            state = PortionState.from_copies(portion, copies.get(portion, []), base, 0)
            self.portions[portion] = state
            log.info(
                "took over %s[%d] at offset %d, seq %d (%d mirrored copies)",
                portion[0],
                portion[1],
                state.next_offset,
                state.next_seq,
                len(state.unsecured),
            )

    # -- announcements ---------------------------------------------------------------------

    def announcement(self, leaving: bool = False) -> MemberAnnouncement:
        assert self.sender is not None
        owned = [
            OwnedPortion(
                topic=st.topic,
                partition=st.partition,
                mirror=st.mirror,
                next_offset=st.next_offset,
                next_seq=st.next_seq,
                sequenced=st.sequenced,
                mirrored_ranges=self.sender.held.get(p, []),
                in_flight=len(st.unsecured),
            )
            for p, st in sorted(self.portions.items())
        ]
        mirrored = [
            MirroredPortion(
                topic=p[0],
                partition=p[1],
                owner=h.owner,
                held=len(h.copies),
                received=h.received,
                last_seq=h.last_seq,
            )
            for p, h in sorted(self.store.portions.items())
        ]
        return MemberAnnouncement(
            member=self.name,
            slot=self.slot,
            epoch=self.map.epoch if self.map else 0,
            at_ms=int(time.time() * 1000),
            started_ms=self.started_ms,
            leaving=leaving,
            map_digest=self.map.digest() if self.map else "",
            owned=owned,
            mirrored=mirrored,
            malformed=self.store.malformed,
        )

    async def _announce(self, leaving: bool = False) -> None:
        assert self._producer is not None
        msg = self.announcement(leaving)
        out = [
            Outgoing(
                self.settings.control_topic, msg.encode(), self.name.encode(), headers=msg.headers()
            )
        ]
        if self.map is not None and self.map.coordinator == self.name:
            out.append(
                Outgoing(
                    self.settings.control_topic,
                    self.map.encode(),
                    b"map",
                    headers=self.map.headers(),
                )
            )
        await self._producer.send_many(out)

    async def _announce_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.announce_interval_s)
            await self._announce()


async def run_worker(settings: Settings) -> None:
    """Run one worker until SIGTERM or SIGINT, then leave the group cleanly."""
    import signal

    worker = Worker(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    try:
        await worker.start()
        await worker.run()
    finally:
        await worker.close()
