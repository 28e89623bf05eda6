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
import random
import re
import time
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.structs import OffsetAndMetadata

from connector.assignor import TandemAssignor
from connector.backup import SetWriter, fence, transactional_id
from connector.checkpoints import read_checkpoints
from connector.clients import Admin, AsyncProducer, Outgoing, TopicSpec
from connector.config import Settings
from connector.control import read_control
from connector.coordinator import (
    Coordinator,
    ReportBook,
    file_control,
    read_manifests,
    read_reports,
)
from connector.errors import MalformedMessage, TandemError, TopicError
from connector.groupconfig import claim_group_config
from connector.http import HttpServer
from connector.ingest import Ingest
from connector.messages import (
    Handover,
    HeldPortion,
    Manifest,
    MemberAnnouncement,
    MemberMetadata,
    MirroredPortion,
    MirroredRecord,
    OwnedPortion,
    PortionMap,
    decode,
    header,
)
from connector.metrics import Metrics
from connector.mirror import (
    SYNC,
    MirrorSender,
    MirrorStore,
    handoff_envelopes,
    marker_envelope,
    read_copies,
)
from connector.owner import Backpressure, Portion, PortionState
from connector.reader import standalone_consumer
from connector.sets import Windows
from connector.topology import follow_topology

log = logging.getLogger(__name__)

# A surviving mirror passes its copies on within a moment of the rebalance; one that does
# not may be dead with its session not yet expired, and the mirror topic has the copies too.
HANDOFF_WAIT_S = 3.0


DAY_MS = str(24 * 3600 * 1000)


def internal_topics(settings: Settings) -> list[TopicSpec]:
    """The group's own topics on the backup cluster and the shape each must have.

    Copies in the mirror topic matter only until a set secures them (seconds), so the topic
    keeps them for ``mirror.retention_hours`` rather than forever: it carries every update
    twice. The control topic is compacted: announcements (keyed by member) are the bulk of
    it and only the newest per member matters; maps (keyed by epoch) and reports (keyed by
    set and member) keep distinct keys. Manifests are the catalogue of the backup: kept.
    Every topic takes records as large as the backup producers send.
    """
    size = settings.backup_topic_config
    mirror_ms = str(int(settings.mirror.retention_hours * 3_600_000))
    return [
        TopicSpec(
            settings.mirror_topic, settings.mirror.max_workers, (("retention.ms", mirror_ms), *size)
        ),
        TopicSpec(settings.control_topic, 1, (("cleanup.policy", "compact"), *size)),
        TopicSpec(settings.sets_topic, 1, (("retention.ms", "-1"), *size)),
        # Ingest requests and answers are live conversations: a day is plenty.
        TopicSpec(
            settings.ingest_topic, settings.mirror.max_workers, (("retention.ms", DAY_MS), *size)
        ),
    ]


async def primary_topics(admin: Admin, settings: Settings) -> dict[str, int]:
    """The primary topics to back up, checked without creating any of them."""
    counts = await admin.partition_counts()
    src = settings.source
    if settings.subscription_pattern:
        pattern = re.compile(settings.subscription_pattern)
        return {t: n for t, n in counts.items() if pattern.match(t)}
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
        self.store = MirrorStore(
            self._backup_client,
            topic=settings.mirror_topic,
            member=self.name,
            memory_records=settings.mirror.memory_records,
        )
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
        self._next_map: PortionMap | None = None
        self.handover: Handover | None = None
        # Reports and maps as the control topic holds them, kept by _follow_control, so a
        # takeover only has to catch up instead of reading the topic from its start.
        self.book = ReportBook()
        self._control_read = -1
        self._leaving = False
        self._joining = False
        self._leave_task: asyncio.Task[None] | None = None
        self._paused: set[TopicPartition] = set()
        self._assign_error: Exception | None = None
        self.backpressure = Backpressure(settings.source.max_unsecured_records)
        # A request to join or leave counts for the coordinator while it is this fresh.
        self.request_fresh_ms = int(max(3 * settings.announce_interval_s, 2) * 1000)
        self.metrics = Metrics(self)
        self.ingest = Ingest(self)
        self.http = HttpServer(self, settings.http)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        await self.http.start()
        topics = await primary_topics(self._admin, s)
        if not topics and not s.source.topic_regex:
            raise TopicError("no primary topics to back up")
        await self._backup_admin.ensure_topics(internal_topics(s))
        self._producer = AsyncProducer(s.backup_producer())
        await claim_group_config(self._producer, self._backup_client, s)
        await self._backup_admin.ensure_topics(
            [TopicSpec(s.backup_topic(t), n, s.backup_topic_config) for t, n in topics.items()]
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
        self.sender = MirrorSender(
            self._producer,
            topic=s.mirror_topic,
            group=s.group,
            member=self.name,
            batch_records=s.mirror.batch_records,
            batch_bytes=s.mirror.batch_bytes,
            max_unsent=s.mirror.batch_records * 20,
        )
        self._spawn(self._follow_control(), "control")
        self._spawn(self._follow_manifests(), "manifests")
        self._spawn(self._announce_loop(), "announcer")
        self._spawn(self.sender.run(), "mirror-sender")
        await self.ingest.start()
        self._spawn(self.ingest.run(), "ingest")
        await self._await_turn()
        if self._closing.is_set():
            return  # stopped while waiting for its turn: it never joined
        assignor = TandemAssignor(self._metadata, s.mirror.max_workers, self._on_map)
        session = s.source.session_timeout_ms
        self._consumer = AIOKafkaConsumer(
            **s.source.aiokafka(),
            group_id=s.group,
            group_instance_id=self.name if s.source.static_membership else None,
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
            metadata_max_age_ms=s.source.metadata_max_age_ms,
        )
        listener = _Listener(self)
        if s.source.topic_regex:
            self._consumer.subscribe(pattern=s.subscription_pattern, listener=listener)
        else:
            self._consumer.subscribe(topics=list(topics), listener=listener)
        await self._consumer.start()
        log.info("worker %s started: group %s, topics %s", self.name, s.group, sorted(topics))

    async def _await_turn(self) -> None:
        """Join a running group only at a set boundary (protocol step 5).

        A newcomer asks to join (``joining`` in its announcements); the coordinator answers
        with a handover naming the boundary set B and the portions that will move; their
        owners stop them at cut B; once manifest B is committed the newcomer joins, and the
        rebalance that follows moves exactly those portions, to continue from cut B. If
        the group is not running, or this member id is still in the map (this process
        restarts a worker whose old session has not expired yet), there is nothing to hand
        over and it joins at once. If no answer comes, it joins anyway: takeover is safe
        mid-set too, it just is not at a boundary.
        """
        s = self.settings
        view = await read_control(self._backup_client, s.control_topic)
        current = view.latest_map
        live = view.live(int(time.time() * 1000), self.request_fresh_ms)
        if current is None or not any(m.name in live for m in current.members):
            return
        if any(m.name == self.name for m in current.members):
            log.info("%s is in map epoch %d: rejoining at once", self.name, current.epoch)
            return
        self._joining = True
        try:
            boundary = await self._handover_committed(joining=True)
            if boundary is not None:
                log.info("joining after set %d", boundary)
        finally:
            self._joining = False

    async def _wait_for(self, done: Callable[[], bool], *, timeout_s: float, what: str) -> bool:
        deadline = time.monotonic() + timeout_s
        while not done():
            self.check_errors()
            if self._closing.is_set():
                return False
            if time.monotonic() > deadline:
                log.warning("no %s after %.0f s: going on without it", what, timeout_s)
                return False
            await asyncio.sleep(0.05)
        return True

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.append(task)

    def check_errors(self) -> None:
        """Surface a failed background task in the main loop instead of losing it."""
        if self._assign_error is not None:
            raise TandemError(
                f"applying the new portion map failed: {self._assign_error}"
            ) from self._assign_error
        extra = [t for t in (self._store_task, self._coordinator_task) if t is not None]
        for task in self._tasks + extra:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise TandemError(f"{task.get_name()} failed: {task.exception()}") from (
                    task.exception()
                )

    async def run(self) -> None:
        """Read, number and mirror until close() is called."""
        if self._consumer is None:
            return
        assert self.sender is not None
        while not self._closing.is_set():
            self.check_errors()
            batch = await self._consumer.getmany(timeout_ms=200, max_records=5000)
            for tp, records in batch.items():
                state = self.portions.get((tp.topic, tp.partition))
                if state is None:
                    continue
                taken = state.take(records)
                if state.stopped:
                    self._pause(tp)
                assert self.map is not None
                mirror = state.mirror
                if taken and mirror is not None and any(m.name == mirror for m in self.map.members):
                    self.sender.enqueue(
                        state.portion, mirror, self.map.slot_of(mirror), self.map.epoch, taken
                    )
                # else the mirror just left the map: the new mirror gets these with the
                # re-send of everything unsecured that ends the rebalance.
            self._hold_back()
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
            assigned = self._consumer.assignment()
            for state in self.portions.values():
                tp = TopicPartition(state.topic, state.partition)
                if tp not in assigned:
                    continue  # a subscribed topic appeared or went: a rebalance is coming
                position = await self._consumer.position(tp)
                state.tick(
                    now,
                    fresh_grace,
                    position,
                    position if self.backpressure.engaged else self._consumer.highwater(tp),
                )
                if state.stopped:
                    self._pause(tp)
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
                t0 = time.monotonic()
                report = await self.writer.write(n, self.map.epoch, pieces)
                self.metrics.set_written(report, time.monotonic() - t0)
                for st in self.portions.values():
                    st.sets.drop(n)

    def _hold_back(self) -> None:
        """Backpressure: no fetching while too much is unsecured, so memory stays bounded."""
        assert self._consumer is not None
        assigned = self._consumer.assignment()
        tps = [
            tp
            for tp in (TopicPartition(*p) for p in self.portions)
            if tp in assigned and tp not in self._paused
        ]
        if self.backpressure.update(self.portions.values()):
            self._consumer.pause(*tps)
        else:
            self._consumer.resume(*tps)

    def _pause(self, tp: TopicPartition) -> None:
        """Stop fetching a portion that reached its handover boundary.

        The records fetched past the cut were not numbered: the position goes back to the
        cut, so whatever reads this portion next starts exactly there.
        """
        assert self._consumer is not None
        if tp not in self._paused:
            self._paused.add(tp)
            self._consumer.pause(tp)
            self._consumer.seek(tp, self.portions[(tp.topic, tp.partition)].next_offset)

    def stop(self) -> None:
        """First call: hand everything over at the next boundary, then leave. Second: leave now."""
        others = self.map is not None and any(m.name != self.name for m in self.map.members)
        if self._leave_task is None and others and not self._closing.is_set():
            self._leaving = True
            self._leave_task = asyncio.create_task(self._leave(), name="leave")
        else:
            self._closing.set()

    async def _settle_before_leaving(self) -> None:
        """Let a rebalance in progress finish before leaving the group.

        A member that leaves while the group is forming (another member's join pending)
        forces a second rebalance at once, and on the embedded broker we saw a group that
        never completed one after such a leave (docs/broker-notes.md). One heartbeat
        interval is how long it takes to hear that a rebalance began.
        """
        session_s = self.settings.source.session_timeout_ms / 1000
        await asyncio.sleep(max(0.1, session_s / 5))
        for _ in range(int(3 * session_s / 0.05)):
            if not self.metrics.rebalancing:
                return
            await asyncio.sleep(0.05)
        log.warning("leaving the group in the middle of a rebalance")

    async def _leave(self) -> None:
        """Graceful stop: the coordinator plans a handover; leave once its set is committed."""
        try:
            boundary = await self._handover_committed(joining=False)
            if boundary is not None:
                log.info("set %d committed: leaving the group", boundary)
        finally:
            self._closing.set()

    async def _handover_committed(self, *, joining: bool) -> int | None:
        """Ask to join or leave, then wait for the handover naming us and its set's manifest.

        Returns the boundary set, or None when no handover came in time (the caller goes
        on without one: takeover is safe mid-set too).
        """
        asked_ms = int(time.time() * 1000)
        await self._announce()
        interval_s = self._interval_ms / 1000

        def named(h: Handover | None) -> bool:
            return (
                h is not None
                and self.name in (h.joining if joining else h.leaving)
                and h.at_ms >= asked_ms - 1000
            )

        if not await self._wait_for(
            lambda: named(self.handover),
            timeout_s=2 * interval_s + 10,
            what="a handover from the coordinator",
        ):
            return None
        assert self.handover is not None
        boundary = self.handover.set_id
        log.info(
            "handover at set %d: %d portions move to this worker, %d away",
            boundary,
            sum(1 for m in self.handover.moves if m.to_member == self.name),
            sum(1 for m in self.handover.moves if m.from_member == self.name),
        )
        await self._wait_for(
            lambda: self.last_manifest is not None and self.last_manifest.set_id >= boundary,
            timeout_s=3 * interval_s + 10,
            what=f"manifest {boundary}",
        )
        return boundary

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        await self.http.stop()
        self.metrics.close()
        try:
            if self.sender is not None:  # else it stopped before it ever announced itself
                await asyncio.wait_for(self.sender.drain(), 10)
                self._leaving = True
                await self._announce()
        except Exception as exc:
            log.warning("while closing: %r", exc)
        finally:
            if self._consumer is not None:
                await self._settle_before_leaving()
                await self._consumer.stop()
            for task in [*self._tasks, self._store_task, self._coordinator_task, self._leave_task]:
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            await self.ingest.close()
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
            leaving=self._leaving,
        )

    def _on_map(self, new_map: PortionMap) -> None:
        # Taken into use by on_assigned, together with the portions it assigns: until then
        # the read loop keeps numbering and mirroring under the map it started with.
        self._next_map = new_map

    async def on_revoked(self) -> None:
        """Before the group moves anything, every update numbered so far reaches its mirror."""
        self.metrics.rebalance_started()
        await self.ingest.quiesce()
        async with self._write_lock:
            if self.sender is not None:
                await self.sender.drain()

    async def on_assigned(self, assigned: list[TopicPartition]) -> None:
        async with self._write_lock:
            try:
                await self._assigned(assigned)
            except Exception as exc:  # aiokafka would only log it and go on half-assigned
                self._assign_error = exc

    async def _assigned(self, assigned: list[TopicPartition]) -> None:
        assert self._consumer is not None and self.sender is not None
        if self._next_map is None:
            log.error("assigned partitions without a portion map: keeping the old one")
            return
        new_map = self.map = self._next_map
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

        for tp in self._paused:
            if tp in self._consumer.assignment():
                self._consumer.resume(tp)
        self._paused.clear()
        mine = {(tp.topic, tp.partition) for tp in assigned}
        for portion in list(self.portions):
            if portion not in mine:
                del self.portions[portion]
                self.sender.forget(portion)
        for state in self.portions.values():
            state.stop_after = None  # a boundary belongs to the map it was planned in
        await follow_topology(self._backup_admin, self.settings, previous_map, new_map)
        if previous_map is not None:
            await self._pass_on_copies(previous_map, new_map)
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
        self.metrics.rebalance_finished()

    async def _open_writer(self, new_map: PortionMap, slot: int) -> None:
        """A transactional producer for this slot; initialising it fences the slot's zombie."""
        if self._txn_producer is not None:
            await self._txn_producer.close()
        s = self.settings
        self._txn_producer = AsyncProducer(
            s.backup_producer(), transactional_id=transactional_id(s.group, slot)
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
                max_slots=s.mirror.max_workers,
                request_fresh_ms=self.request_fresh_ms,
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
            Outgoing(
                self.settings.control_topic,
                m.encode(),
                f"map-{m.epoch}".encode(),
                headers=m.headers(),
            )
        )

    async def _sync_store(self) -> bool:
        """Read our own mirror partition up to a marker sent now.

        Every envelope a dead owner had acknowledged is then in the store.
        """
        assert self._producer is not None
        token = random.getrandbits(48)
        marker = marker_envelope(
            group=self.settings.group,
            owner=self.name,
            to=self.name,
            epoch=0,
            portion=SYNC,
            last_seq=token,
        )
        await self._producer.send(
            Outgoing(
                self.settings.mirror_topic,
                marker.encode(),
                b"sync",
                partition=self.slot,
                headers=marker.headers(),
            )
        )
        return await self.store.marker(SYNC, timeout_s=10, token=token)

    async def _pass_on_copies(self, previous: PortionMap, new_map: PortionMap) -> None:
        """A mirror whose owner died sends its copies to a new owner that is not itself."""
        assert self._producer is not None
        moving = []
        for before in previous.portions:
            now = new_map.portion(before.topic, before.partition)
            if now is None or before.mirror != self.name or now.owner == self.name:
                continue
            if departed(before.owner, previous, new_map):
                moving.append(((before.topic, before.partition), before.owner, now.owner))
        if not moving:
            return
        if not await self._sync_store():
            log.warning("mirror store not in sync: new owners read the mirror topic instead")
            return
        envelopes = []
        for portion, owner, to in moving:
            await self.store.recall(portion)
            copies = self.store.take(portion)
            envelopes += [
                (new_map.slot_of(to), env)
                for env in handoff_envelopes(
                    group=self.settings.group,
                    owner=owner,
                    to=to,
                    epoch=new_map.epoch,
                    portion=portion,
                    copies=copies,
                    batch_records=self.settings.mirror.batch_records,
                )
            ]
            log.info(
                "passing %d copies of %s[%d] to its new owner %s",
                len(copies),
                portion[0],
                portion[1],
                to,
            )
        await self._producer.send_many(
            [
                Outgoing(
                    self.settings.mirror_topic,
                    env.encode(),
                    f"{env.topic}:{env.partition}".encode(),
                    partition=slot,
                    headers=env.headers(),
                )
                for slot, env in envelopes
            ]
        )

    async def _take_over(
        self, portions: list[Portion], previous: PortionMap | None, new_map: PortionMap
    ) -> None:
        """Continue newly owned portions exactly after their last secured point.

        Owners that left the group are fenced first (their open transaction ends), then the
        base is the newest of the last manifest and the committed reports of legitimate
        owners. A portion whose owner left continues with the mirrored copies past the
        base: this worker's own, if it was the mirror; the surviving mirror's, which it
        passes on; or, with owner and mirror both gone, whatever the mirror topic holds.
        A portion handed over by a live owner continues at its base: that owner stopped
        at the boundary (or, mid-set, numbered the same records the same way). Offsets
        come from the admin client and ListOffsets: asking the group consumer for its
        position inside the rebalance callback would wait on the very rebalance it is part
        of.
        """
        assert self._consumer is not None
        started = time.monotonic()
        s = self.settings
        if previous is None:
            await self._sync_control()
            older = [e for e in self.book.maps if e < new_map.epoch]
            previous = self.book.maps[max(older)] if older else None
        stale: list[str] = []
        orphaned: dict[Portion, str | None] = {}  # portion -> its surviving mirror
        if previous is not None:
            for p in portions:
                e = previous.portion(*p)
                if e is not None and departed(e.owner, previous, new_map):
                    alive = e.mirror is not None and not departed(e.mirror, previous, new_map)
                    orphaned[p] = e.mirror if alive else None
            gone = {e.owner for p in orphaned if (e := previous.portion(*p))}
            slots = {m.name: m.slot for m in previous.members}
            taken = {m.slot for m in new_map.members}
            stale = [
                transactional_id(s.group, slots[g])
                for g in sorted(gone)
                if g in slots and slots[g] not in taken
            ]
            await asyncio.gather(*(fence(s.backup_cluster.confluent(), t) for t in stale))
            self.metrics.failed_over(len(orphaned))
        fenced = time.monotonic()
        # Reports are caught up after the fence, so no departed owner's transaction is open.
        book = await self._sync_control()
        # The manifest follower may be a moment behind; the book, caught up just now and
        # pruned only by that same follower, then still holds the newer sets' reports.
        last = self.last_manifest
        copies = await self._collect_copies(orphaned)
        committed = await self._admin.group_offsets(s.group, portions)
        tps = [TopicPartition(*p) for p in portions]
        if s.source.start_from == "earliest" or last is not None:
            # A portion new to a running group (a topic or partition added) starts at its
            # first record whatever start_from says: it was created after the group began.
            ends = await self._consumer.beginning_offsets(tps)
        else:
            ends = await self._consumer.end_offsets(tps)
        windows = Windows(self._interval_ms, new_map.first_window)
        for portion, tp in zip(portions, tps, strict=True):
            # A portion no manifest names yet joins the group's next set, not set 0.
            set_id = last.set_id + 1 if last is not None else 0
            base_offset, base_seq = committed.get(portion, ends[tp]), 0
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
        log.info(
            "takeover of %d portions (%d orphaned) took %.0f ms (fencing %.0f ms)",
            len(portions),
            len(orphaned),
            (time.monotonic() - started) * 1000,
            (fenced - started) * 1000,
        )

    async def _collect_copies(
        self, orphaned: dict[Portion, str | None]
    ) -> dict[Portion, list[MirroredRecord]]:
        """The mirrored copies of portions whose owner left, from the nearest place."""
        assert self._producer is not None
        out: dict[Portion, list[MirroredRecord]] = {}
        synced = any(mirror == self.name for mirror in orphaned.values()) and (
            await self._sync_store()
        )
        missing = []
        for portion, mirror in orphaned.items():
            if (mirror == self.name and synced) or (
                mirror not in (None, self.name)
                and await self.store.marker(portion, timeout_s=HANDOFF_WAIT_S)
            ):
                await self.store.recall(portion)
                out[portion] = self.store.take(portion)
            else:
                missing.append(portion)
        if missing:
            log.warning(
                "reading the mirror topic for the copies of %d portions whose mirror is gone",
                len(missing),
            )
            out.update(
                await read_copies(
                    self._backup_client,
                    self.settings.mirror_topic,
                    self._mirror_partitions,
                    missing,
                )
            )
        return out

    async def _follow_manifests(self) -> None:
        """Once a set is committed: commit primary offsets at its cuts, drop its copies."""
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
                        self.metrics.manifest_seen(m)
                    await self._secured(m)

    async def _secured(self, m: Manifest) -> None:
        offsets = {}
        self.book.forget_through(m.set_id)
        for mp in m.portions:
            portion = (mp.topic, mp.partition)
            self.store.drop_through(portion, mp.last_seq)
            state = self.portions.get(portion)
            if state is not None:
                state.secure_through(mp.last_seq)
                offsets[TopicPartition(*portion)] = OffsetAndMetadata(mp.next_offset, "")
        if self._consumer is None:
            return
        assigned = self._consumer.assignment()
        offsets = {tp: o for tp, o in offsets.items() if tp in assigned}
        if offsets:
            try:
                await self._consumer.commit(offsets)
            except Exception as exc:  # a rebalance in progress; the next set commits again
                log.info("primary offsets for set %d not committed now: %r", m.set_id, exc)

    async def _follow_control(self) -> None:
        """Keep the report book and hear handovers: stop portions that move away."""
        async with standalone_consumer(self._backup_client) as consumer:
            tp = TopicPartition(self.settings.control_topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            while True:
                batch = await consumer.getmany(tp, timeout_ms=500, max_records=5000)
                for r in batch.get(tp, []):
                    msg = file_control(self.book, r.value, list(r.headers))
                    self._control_read = r.offset
                    if msg is None:
                        self.store.malformed += 1
                    elif isinstance(msg, Handover):
                        self._on_handover(msg)

    async def _sync_control(self) -> ReportBook:
        """The report book up to now: announce, then wait until the follower read that far.

        Anything committed before our own record is before it in the topic (read_committed
        returns records in offset order), so the book then holds every report written so
        far, the transactions we just fenced included.
        """
        offset = await self._announce()
        if not await self._wait_for(
            lambda: self._control_read >= offset, timeout_s=15, what="the control topic"
        ):
            log.warning("control follower behind: reading the control topic from its start")
            return await read_reports(self._backup_client, self.settings.control_topic)
        return self.book

    def _on_handover(self, h: Handover) -> None:
        self.handover = h
        if self.map is None or h.epoch != self.map.epoch:
            return
        for portion in h.moving_from(self.name):
            state = self.portions.get(portion)
            if state is None:
                continue
            if state.sets.open > h.set_id:
                log.warning(
                    "%s[%d] already formed set %d: it moves mid-set, not at boundary %d",
                    portion[0],
                    portion[1],
                    state.sets.open,
                    h.set_id,
                )
                continue
            state.stop_after = h.set_id
        log.info("handover at set %d: %s", h.set_id, h.reason)

    # -- announcements ---------------------------------------------------------------------

    def owned(self) -> list[OwnedPortion]:
        """What this worker owns, as it tells the group (and status and metrics judge)."""
        assert self.sender is not None
        return [
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

    def announcement(self) -> MemberAnnouncement:
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
            http_url=self.http.url,
            leaving=self._leaving,
            joining=self._joining,
            map_digest=self.map.digest() if self.map else "",
            owned=self.owned(),
            mirrored=mirrored,
            malformed=self.store.malformed,
        )

    async def _announce(self) -> int:
        """Publish this worker's state; returns the record's offset on the control topic."""
        assert self._producer is not None
        msg = self.announcement()
        out = [
            Outgoing(
                self.settings.control_topic, msg.encode(), self.name.encode(), headers=msg.headers()
            )
        ]
        return (await self._producer.send_many(out))[0][1]

    async def _announce_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.announce_interval_s)
            await self._announce()


def departed(name: str, previous: PortionMap, new_map: PortionMap) -> bool:
    """Left the group between two maps: gone, or back as a new process (a new Kafka id)."""
    before = {m.name: m.kafka_member_id for m in previous.members}
    now = {m.name: m.kafka_member_id for m in new_map.members}
    return name not in now or (name in before and before[name] != now[name])


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
