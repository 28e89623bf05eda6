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
from functools import partial
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from connector.assignor import TandemAssignor
from connector.backup import SetWriter, fence, transactional_id
from connector.checkpoints import read_checkpoints
from connector.clients import Admin, AsyncProducer, Outgoing, TopicSpec
from connector.config import Settings
from connector.coordinator import Coordinator, read_manifests, read_reports
from connector.errors import MalformedMessage, TandemError, TopicError
from connector.messages import (
    HeldPortion,
    Manifest,
    MemberAnnouncement,
    MemberMetadata,
    MirroredPortion,
    OwnedPortion,
    PortionMap,
    decode,
    header,
)
from connector.mirror import MirrorSender, MirrorStore, read_copies
from connector.owner import Portion, PortionState
from connector.reader import standalone_consumer
from connector.sets import Windows

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
        self.writer: SetWriter | None = None
        self._txn_producer: AsyncProducer | None = None
        self._write_lock = asyncio.Lock()
        self.coordinator: Coordinator | None = None
        self._coordinator_task: asyncio.Task[None] | None = None
        self.last_manifest: Manifest | None = None
        self._first_window = -1
        self._interval_ms = int(settings.window.interval_s * 1000)
        self._grace_ms = int(settings.window.grace_s * 1000)
        self._previous_map: PortionMap | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        topics = await primary_topics(self._admin, s)
        if not topics and not s.source.topic_regex:
            raise TopicError("no primary topics to back up")
        await self._backup_admin.ensure_topics(
            internal_topics(s) + [TopicSpec(s.backup_topic(t), n) for t, n in topics.items()]
        )
        manifests = await read_manifests(self._backup_client, s.sets_topic)
        if manifests:
            first = manifests[min(manifests)]
            self._first_window = first.window_end_ms // self._interval_ms - first.set_id
            self.last_manifest = manifests[max(manifests)]
        else:
            self._first_window = Windows.first_window_after(
                int(time.time() * 1000), self._interval_ms
            )
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
            fetch_max_wait_ms=200,
        )
        listener = _Listener(self)
        if s.source.topic_regex:
            self._consumer.subscribe(pattern=s.source.topic_regex, listener=listener)
        else:
            self._consumer.subscribe(topics=list(topics), listener=listener)
        await self._consumer.start()
        self._spawn(self.sender.run(), "mirror-sender")
        self._spawn(self._announce_loop(), "announcer")
        self._spawn(self._follow_manifests(), "manifests")
        log.info("worker %s started: group %s, topics %s", self.name, s.group, sorted(topics))

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.append(task)

    def check_errors(self) -> None:
        """Surface a failed background task in the main loop instead of losing it."""
        extra = [t for t in (self._store_task, self._coordinator_task) if t is not None]
        for task in self._tasks + extra:
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
            await self._seal_and_write()
            await self.sender.wait_room()

    async def _seal_and_write(self) -> None:
        """Seal idle windows, then write every set all owned portions have sealed, in order."""
        assert self._consumer is not None and self.sender is not None
        if self.writer is None or self.map is None:
            return
        now = int(time.time() * 1000)
        # A high watermark read this soon after T+grace may predate it: wait one fetch more.
        fresh_grace = self._grace_ms + 300
        async with self._write_lock:
            for state in self.portions.values():
                tp = TopicPartition(state.topic, state.partition)
                state.sets.tick(
                    now,
                    fresh_grace,
                    await self._consumer.position(tp),
                    self._consumer.highwater(tp),
                )
            while self.portions:
                n = min(min(st.sets.pieces) for st in self.portions.values())
                if any(st.sets.open <= n for st in self.portions.values()):
                    return
                pieces = []
                for st in self.portions.values():
                    piece = st.sets.sealed(n)
                    if piece is not None:
                        pieces.append((st.topic, st.partition, piece, st.mirror))
                # Two holders before the set is written: the mirror has every record of it.
                await self.sender.drain()
                await self.writer.write(n, self.map.epoch, pieces)
                for st in self.portions.values():
                    st.sets.drop(n)

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
            for task in [*self._tasks, self._store_task, self._coordinator_task]:
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            for producer in (self._producer, self._txn_producer):
                if producer is not None:
                    await producer.close()
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
            first_window=self.map.first_window if self.map else self._first_window,
            owned=[HeldPortion(topic=t, partition=p) for t, p in sorted(self.portions)],
            mirrored=mirrored,
            leaving=self._closing.is_set(),
        )

    def _on_map(self, new_map: PortionMap) -> None:
        self.map = new_map

    async def on_revoked(self) -> None:
        """Before the group moves anything, every update numbered so far reaches its mirror."""
        async with self._write_lock:
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
        previous_map = self._previous_map
        self._previous_map = new_map
        if slot != self.slot:
            self.slot = slot
            if self._store_task is not None:
                self._store_task.cancel()
            self._store_task = asyncio.create_task(self.store.run(slot), name="mirror-store")
            await self._open_writer(new_map, slot)
        self._steer_coordinator(new_map)

        mine = {(tp.topic, tp.partition) for tp in assigned}
        for portion in list(self.portions):
            if portion not in mine:
                del self.portions[portion]
                self.sender.forget(portion)
        new = sorted(mine - set(self.portions))
        if new:
            await self._take_over(new, previous_map, new_map)
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

    async def _open_writer(self, new_map: PortionMap, slot: int) -> None:
        """A transactional producer for this slot; initialising it fences the slot's zombie."""
        if self._txn_producer is not None:
            await self._txn_producer.close()
        s = self.settings
        self._txn_producer = AsyncProducer(
            s.backup_cluster.confluent(), transactional_id=transactional_id(s.group, slot)
        )
        await self._txn_producer.init_transactions()
        self.writer = SetWriter(
            self._txn_producer,
            member=self.name,
            slot=slot,
            control_topic=s.control_topic,
            prefix=s.backup.topic_prefix,
            windows=Windows(self._interval_ms, new_map.first_window),
        )

    def _steer_coordinator(self, new_map: PortionMap) -> None:
        """Run the coordinator exactly while this worker leads the map."""
        leading = new_map.coordinator == self.name
        running = self._coordinator_task is not None and not self._coordinator_task.done()
        if leading and not running:
            s = self.settings
            self.coordinator = Coordinator(
                group=s.group,
                member=self.name,
                client=self._backup_client,
                producer_conf=s.backup_cluster.confluent(),
                control_topic=s.control_topic,
                sets_topic=s.sets_topic,
                prefix=s.backup.topic_prefix,
                interval_ms=self._interval_ms,
                current_map=lambda: self.map,
                checkpoints=partial(read_checkpoints, self._admin, s.checkpoint_groups),
            )
            self._coordinator_task = asyncio.create_task(self.coordinator.run(), name="coordinator")
        elif not leading and running:
            assert self._coordinator_task is not None
            self._coordinator_task.cancel()
            self._coordinator_task = None
            self.coordinator = None
        if leading:
            self._spawn(self._publish_map(new_map), "publish-map")

    async def _publish_map(self, m: PortionMap) -> None:
        assert self._producer is not None
        await self._producer.send(
            Outgoing(self.settings.control_topic, m.encode(), b"map", headers=m.headers())
        )

    async def _take_over(
        self, portions: list[Portion], previous: PortionMap | None, new_map: PortionMap
    ) -> None:
        """Continue newly owned portions exactly after their last secured point.

        First the previous owners that left the group are fenced (their open transaction
        ends), then the base is the newest of the last manifest and the committed reports of
        legitimate owners; the mirrored copies past the base are re-cut into sets and the
        primary resumes after the last copy. Offsets come from the admin client and
        ListOffsets: asking the group consumer for its position inside the rebalance
        callback would wait on the very rebalance it is part of.
        """
        assert self._consumer is not None
        s = self.settings
        book = None
        if previous is None:
            book = await read_reports(self._backup_client, s.control_topic)
            previous = book.latest_map
        stale: list[str] = []
        if previous is not None:
            alive = {m.name for m in new_map.members}
            gone = {
                e.owner for p in portions if (e := previous.portion(*p)) and e.owner not in alive
            }
            slots = {m.name: m.slot for m in previous.members}
            taken = {m.slot for m in new_map.members}
            stale = [
                transactional_id(s.group, slots[g])
                for g in sorted(gone)
                if g in slots and slots[g] not in taken
            ]
            await asyncio.gather(*(fence(s.backup_cluster.confluent(), t) for t in stale))
        if book is None or stale:
            # Reports are read after the fence, so no departed owner's transaction is open.
            book = await read_reports(self._backup_client, s.control_topic)
        manifests = await read_manifests(self._backup_client, s.sets_topic)
        last = manifests[max(manifests)] if manifests else None
        copies = await read_copies(
            self._backup_client, s.mirror_topic, self._mirror_partitions, portions
        )
        committed = await self._admin.group_offsets(s.group, portions)
        tps = [TopicPartition(*p) for p in portions]
        if s.source.start_from == "earliest":
            ends = await self._consumer.beginning_offsets(tps)
        else:
            ends = await self._consumer.end_offsets(tps)
        windows = Windows(self._interval_ms, new_map.first_window)
        for portion, tp in zip(portions, tps, strict=True):
            set_id, base_offset, base_seq = 0, committed.get(portion, ends[tp]), 0
            if last is not None:
                mp = next((x for x in last.portions if (x.topic, x.partition) == portion), None)
                if mp is not None:
                    set_id, base_offset, base_seq = last.set_id + 1, mp.next_offset, mp.last_seq + 1
            reported = book.latest(portion)
            if reported is not None and reported[0] + 1 > set_id:
                pr = reported[1]
                set_id, base_offset, base_seq = reported[0] + 1, pr.next_offset, pr.last_seq + 1
            state = PortionState.resume(
                portion,
                windows,
                set_id=set_id,
                base_offset=base_offset,
                base_seq=base_seq,
                copies=copies.get(portion, []),
            )
            self.portions[portion] = state
            log.info(
                "took over %s[%d] at set %d, offset %d, seq %d (%d mirrored copies)",
                portion[0],
                portion[1],
                set_id,
                state.next_offset,
                state.next_seq,
                len(state.unsecured),
            )

    async def _follow_manifests(self) -> None:
        """Once a set is committed: commit primary offsets at its cuts, drop its copies."""
        assert self._consumer is not None
        async with standalone_consumer(self._backup_client) as consumer:
            tp = TopicPartition(self.settings.sets_topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            while True:
                batch = await consumer.getmany(tp, timeout_ms=500)
                for r in batch.get(tp, []):
                    try:
                        m = decode(Manifest, r.value, header(r.headers, "tandem.schema"))
                    except MalformedMessage as exc:
                        self.store.malformed += 1
                        log.warning("skipping malformed record on %s: %s", tp.topic, exc)
                        continue
                    if self.last_manifest is None or m.set_id > self.last_manifest.set_id:
                        self.last_manifest = m
                    await self._secured(m)

    async def _secured(self, m: Manifest) -> None:
        assert self._consumer is not None
        offsets = {}
        for mp in m.portions:
            portion = (mp.topic, mp.partition)
            self.store.drop_through(portion, mp.last_seq)
            state = self.portions.get(portion)
            if state is not None:
                state.secure_through(mp.last_seq)
                offsets[TopicPartition(*portion)] = OffsetAndMetadata(mp.next_offset, "")
        assigned = self._consumer.assignment()
        offsets = {tp: o for tp, o in offsets.items() if tp in assigned}
        if offsets:
            try:
                await self._consumer.commit(offsets)
            except Exception as exc:  # a rebalance in progress; the next set commits again
                log.info("primary offsets for set %d not committed now: %r", m.set_id, exc)

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
