"""Protocol step 2: mirroring.

The owner sends every sequenced update to its portion's mirror through ``<group>.mirror``
(partition = the mirror's slot), a run of consecutive updates per message. The mirror keeps
the copies, with sender and sequence numbers, until a committed manifest covers them. The
owner records which mirror holds which sequence numbers once the cluster acknowledged the
envelope: from then on the update survives the owner.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from connector.clients import AsyncProducer, Outgoing
from connector.errors import MalformedMessage
from connector.messages import (
    SCHEMA_HEADER,
    HeldRange,
    MirroredRecord,
    MirrorEnvelope,
    decode,
    header,
)
from connector.reader import read_until_end, standalone_consumer

log = logging.getLogger(__name__)

Portion = tuple[str, int]
SYNC: Portion = ("", -1)  # the pseudo-portion of a worker's marker to itself


def _record_size(r: MirroredRecord) -> int:
    return (
        40
        + len(r.key or b"")
        + len(r.value or b"")
        + sum(len(h.key) + len(h.value or b"") for h in r.headers)
    )


@dataclass
class _Outbox:
    mirror: str
    slot: int
    epoch: int
    records: list[MirroredRecord] = field(default_factory=list)


class MirrorSender:
    """Owner side: batches sequenced updates into envelopes and records who holds what.

    One flusher task sends whatever accumulated while the previous send was in flight, so
    envelopes grow with load (group commit) and the read loop never waits per record.
    ``wait_room`` is the backpressure: the read loop stops when too much is unsent.
    """

    def __init__(
        self,
        producer: AsyncProducer,
        *,
        topic: str,
        group: str,
        member: str,
        batch_records: int,
        batch_bytes: int,
        max_unsent: int,
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._group = group
        self._member = member
        self._batch_records = batch_records
        self._batch_bytes = batch_bytes
        self._max_unsent = max_unsent
        self._outboxes: dict[Portion, _Outbox] = {}
        self._unsent = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self.held: dict[Portion, list[HeldRange]] = defaultdict(list)
        self.mirrored_through: dict[Portion, int] = {}
        self.envelopes_sent = 0
        # Notified after each acknowledged send: the ingest path answers a client as soon as
        # the mirror holds its record, without polling.
        self.progress = asyncio.Condition()
        self.send_started: float | None = None  # monotonic start of the send in flight

    def enqueue(
        self, portion: Portion, mirror: str, slot: int, epoch: int, records: list[MirroredRecord]
    ) -> None:
        box = self._outboxes.get(portion)
        if box is None or (box.mirror, box.slot, box.epoch) != (mirror, slot, epoch):
            if box is not None and box.records:
                # The mirror changed with records still unsent: they go to the new one.
                records = box.records + records
                self._unsent -= len(box.records)
            box = self._outboxes[portion] = _Outbox(mirror, slot, epoch)
        box.records.extend(records)
        self._unsent += len(records)
        self._idle.clear()
        self._wake.set()
        if self._unsent >= self._max_unsent:
            self._room.clear()

    async def wait_room(self) -> None:
        await self._room.wait()

    async def drain(self) -> None:
        """Return once everything enqueued so far is acknowledged by the cluster."""
        await self._idle.wait()

    def forget(self, portion: Portion) -> None:
        self._outboxes.pop(portion, None)
        self.held.pop(portion, None)
        self.mirrored_through.pop(portion, None)

    def _envelopes(self) -> list[tuple[Portion, MirrorEnvelope]]:
        out: list[tuple[Portion, MirrorEnvelope]] = []
        for portion, box in self._outboxes.items():
            chunk: list[MirroredRecord] = []
            size = 0
            for rec in box.records:
                chunk.append(rec)
                size += _record_size(rec)
                if len(chunk) >= self._batch_records or size >= self._batch_bytes:
                    out.append((portion, self._envelope(portion, box, chunk)))
                    chunk, size = [], 0
            if chunk:
                out.append((portion, self._envelope(portion, box, chunk)))
            self._unsent -= len(box.records)
            box.records = []
        return out

    def _envelope(
        self, portion: Portion, box: _Outbox, records: list[MirroredRecord]
    ) -> MirrorEnvelope:
        return MirrorEnvelope(
            group=self._group,
            owner=self._member,
            mirror=box.mirror,
            epoch=box.epoch,
            topic=portion[0],
            partition=portion[1],
            first_seq=records[0].seq,
            last_seq=records[-1].seq,
            records=records,
        )

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            envelopes = self._envelopes()
            if self._unsent < self._max_unsent:
                self._room.set()
            if envelopes:
                slots = {p: self._outboxes[p].slot for p, _ in envelopes if p in self._outboxes}
                self.send_started = time.monotonic()
                await self._producer.send_many(
                    [
                        Outgoing(
                            topic=self._topic,
                            partition=slots[p],
                            key=f"{p[0]}:{p[1]}".encode(),
                            value=env.encode(),
                            headers=env.headers(),
                        )
                        for p, env in envelopes
                        if p in slots
                    ]
                )
                self.send_started = None
                self.envelopes_sent += len(envelopes)
                for portion, env in envelopes:
                    self._record_held(portion, env)
                async with self.progress:
                    self.progress.notify_all()
            if not self._wake.is_set():
                self._idle.set()

    def _record_held(self, portion: Portion, env: MirrorEnvelope) -> None:
        ranges = self.held[portion]
        last = ranges[-1] if ranges else None
        if last and last.mirror == env.mirror and last.last_seq + 1 == env.first_seq:
            ranges[-1] = HeldRange(
                mirror=env.mirror, first_seq=last.first_seq, last_seq=env.last_seq
            )
        else:
            ranges.append(
                HeldRange(mirror=env.mirror, first_seq=env.first_seq, last_seq=env.last_seq)
            )
        self.mirrored_through[portion] = max(self.mirrored_through.get(portion, -1), env.last_seq)


@dataclass
class _Held:
    owner: str
    received: int = 0
    last_seq: int = -1
    secured_through: int = -1
    copies: dict[int, MirroredRecord] = field(default_factory=dict)
    # Envelopes kept only by their place in the mirror topic: (slot, offset, first, last seq).
    spilled: list[tuple[int, int, int, int]] = field(default_factory=list)

    @property
    def count(self) -> int:
        """Copies held, in memory or by position."""
        return len(self.copies) + sum(
            last - max(first, self.secured_through + 1) + 1 for _, _, first, last in self.spilled
        )


class MirrorStore:
    """Mirror side: the copies this worker holds for portions it does not own.

    It reads its own slot's partition of ``<group>.mirror``. Envelopes addressed to another
    member (a slot's previous holder) are not ours and are skipped; undecodable ones are
    logged and counted, never fatal: the owner still has the update and the topic keeps it.

    At most ``memory_records`` copies stay in memory; past that an envelope is kept only
    by its offset in the partition (the topic keeps it, retention -1), and ``recall`` reads
    such envelopes back when a takeover needs the copies. Memory stays bounded however
    long sets take to commit.
    """

    def __init__(
        self,
        client: dict[str, Any],
        *,
        topic: str,
        member: str,
        memory_records: int = 100_000,
    ) -> None:
        self._client = client
        self._topic = topic
        self._member = member
        self._memory_records = memory_records
        self._slot: int | None = None
        self.portions: dict[Portion, _Held] = {}
        self.handed: dict[Portion, int] = {}  # portion -> last seq a surviving mirror passed on
        self.malformed = 0
        self.foreign = 0

    def held(self) -> int:
        return sum(h.count for h in self.portions.values())

    def in_memory(self) -> int:
        return sum(len(h.copies) for h in self.portions.values())

    def accept(
        self,
        value: bytes | None,
        headers: list[tuple[str, bytes | None]],
        offset: int | None = None,
    ) -> None:
        """Keep an envelope's copies; ``offset`` (its place in our partition) lets the
        store keep only that when memory is full."""
        try:
            env = decode(MirrorEnvelope, value, header(headers, SCHEMA_HEADER))
        except MalformedMessage as exc:
            self.malformed += 1
            log.warning("skipping malformed record on %s: %s", self._topic, exc)
            return
        if env.mirror != self._member:
            self.foreign += 1
            return
        if env.handoff and not env.records:
            self.handed[(env.topic, env.partition)] = env.last_seq
            return
        h = self.portions.setdefault((env.topic, env.partition), _Held(owner=env.owner))
        h.owner = env.owner
        spill = offset is not None and self._slot is not None
        if spill and self.in_memory() + len(env.records) > self._memory_records:
            assert offset is not None and self._slot is not None
            h.received += sum(1 for r in env.records if r.seq > h.last_seq)
            h.spilled.append((self._slot, offset, env.first_seq, env.last_seq))
        else:
            for rec in env.records:
                if rec.seq not in h.copies:
                    h.received += 1
                h.copies[rec.seq] = rec
        h.last_seq = max(h.last_seq, env.last_seq)

    def drop_through(self, portion: Portion, last_seq: int) -> None:
        """A committed manifest covers these: the copies are secured, let them go."""
        h = self.portions.get(portion)
        if h is not None:
            h.secured_through = max(h.secured_through, last_seq)
            h.copies = {s: r for s, r in h.copies.items() if s > last_seq}
            h.spilled = [e for e in h.spilled if e[3] > last_seq]

    async def recall(self, portion: Portion) -> None:
        """Read the copies kept only by position back into memory, before ``take``.

        Only a takeover calls this, so the bound is exceeded only while one portion moves.
        """
        h = self.portions.get(portion)
        if h is None or not h.spilled:
            return
        for slot in sorted({e[0] for e in h.spilled}):
            wanted = {off for sl, off, _, _ in h.spilled if sl == slot}
            tp = TopicPartition(self._topic, slot)
            async with standalone_consumer(self._client) as consumer:
                async for _tp, records in read_until_end(consumer, [tp], start={tp: min(wanted)}):
                    for r in records:
                        if r.offset not in wanted:
                            continue
                        wanted.discard(r.offset)
                        env = decode(
                            MirrorEnvelope, r.value, header(list(r.headers), SCHEMA_HEADER)
                        )
                        for rec in env.records:
                            if rec.seq > h.secured_through:
                                h.copies[rec.seq] = rec
            if wanted:
                raise MalformedMessage(
                    f"{self._topic}[{slot}]: offsets {sorted(wanted)[:5]} of "
                    f"{portion[0]}[{portion[1]}]'s copies are gone"
                )
        h.spilled = []

    def take(self, portion: Portion) -> list[MirroredRecord]:
        """Give up the copies of a portion this worker now owns, in sequence order."""
        h = self.portions.get(portion)
        if h is not None and h.spilled:
            raise RuntimeError(f"{portion}: copies kept by position: recall() them first")
        self.portions.pop(portion, None)
        self.handed.pop(portion, None)
        return [h.copies[s] for s in sorted(h.copies)] if h else []

    async def marker(self, portion: Portion, timeout_s: float, token: int | None = None) -> bool:
        """Wait for the empty envelope that ends a handoff (or carries ``token``).

        Markers travel behind the copies in the same partition, so once one is read
        everything sent before it has been read too: a worker that sends itself a
        ``SYNC`` marker knows it holds every envelope acknowledged before it sent it.
        """
        deadline = time.monotonic() + timeout_s
        while self.handed.get(portion) is None or token not in (None, self.handed[portion]):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def run(self, slot: int) -> None:
        self._slot = slot
        consumer = AIOKafkaConsumer(
            **self._client,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            fetch_max_wait_ms=100,
        )
        await consumer.start()
        try:
            consumer.assign([TopicPartition(self._topic, slot)])
            while True:
                batch = await consumer.getmany(timeout_ms=500, max_records=2000)
                for records in batch.values():
                    for r in records:
                        self.accept(r.value, list(r.headers), r.offset)
        finally:
            await consumer.stop()


def handoff_envelopes(
    *,
    group: str,
    owner: str,
    to: str,
    epoch: int,
    portion: Portion,
    copies: list[MirroredRecord],
    batch_records: int,
) -> list[MirrorEnvelope]:
    """A surviving mirror's copies for a portion's new owner, closed by an empty envelope."""
    where = {"group": group, "owner": owner, "mirror": to, "epoch": epoch}
    out = [
        _handoff(where, portion, chunk, chunk[0].seq, chunk[-1].seq)
        for chunk in (copies[i : i + batch_records] for i in range(0, len(copies), batch_records))
    ]
    last = copies[-1].seq if copies else -1
    out.append(_handoff(where, portion, [], last, last))
    return out


def marker_envelope(
    *, group: str, owner: str, to: str, epoch: int, portion: Portion, last_seq: int
) -> MirrorEnvelope:
    """An empty envelope: the end of a handoff, or (portion SYNC) a token sent to oneself."""
    where = {"group": group, "owner": owner, "mirror": to, "epoch": epoch}
    return _handoff(where, portion, [], last_seq, last_seq)


def _handoff(
    where: dict[str, Any],
    portion: Portion,
    records: list[MirroredRecord],
    first_seq: int,
    last_seq: int,
) -> MirrorEnvelope:
    return MirrorEnvelope(
        **where,
        topic=portion[0],
        partition=portion[1],
        first_seq=first_seq,
        last_seq=last_seq,
        records=records,
        handoff=True,
    )


async def read_copies(
    client: dict[str, Any], topic: str, partitions: int, portions: Iterable[Portion]
) -> dict[Portion, list[MirroredRecord]]:
    """All mirrored copies of the given portions, from every slot's partition, by sequence.

    A new owner uses this to continue exactly where the copies end. Copies of one sequence
    number are identical whoever sent them: a portion's numbering is fixed by its base and
    the primary log, so even a late envelope of a replaced owner agrees.
    """
    wanted = set(portions)
    found: dict[Portion, dict[int, MirroredRecord]] = {p: {} for p in wanted}
    async with standalone_consumer(client) as consumer:
        tps = [TopicPartition(topic, i) for i in range(partitions)]
        async for _tp, records in read_until_end(consumer, tps):
            for r in records:
                key = (r.key or b"").decode(errors="replace")
                t, _, p = key.rpartition(":")
                if not p.isdigit() or (t, int(p)) not in wanted:
                    continue
                try:
                    env = decode(MirrorEnvelope, r.value, header(list(r.headers), SCHEMA_HEADER))
                except MalformedMessage as exc:
                    log.warning("skipping malformed record on %s: %s", topic, exc)
                    continue
                for rec in env.records:
                    found[(env.topic, env.partition)][rec.seq] = rec
    return {p: [c[s] for s in sorted(c)] for p, c in found.items()}
