"""Protocol step 4: the coordinator commits sets.

The coordinator is the group leader of the current map. It reads owners' reports
(read_committed, so a report exists only if its records do), and writes manifest N when
every portion of the current map has a report for N from the portion's owner in the map of
the report's epoch. Manifests are written in order with a transactional id that belongs to
the role, so a newly elected coordinator fences the previous one; and a new coordinator
resumes from the last manifest, so set ids stay contiguous and none is written twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from aiokafka import TopicPartition

from connector.assignor import Candidate, plan
from connector.checkpoints import CheckpointSource, no_checkpoints
from connector.clients import AsyncProducer, Outgoing
from connector.errors import MalformedMessage
from connector.messages import (
    SCHEMA_HEADER,
    Handover,
    HandoverMove,
    HeldPortion,
    Manifest,
    ManifestPortion,
    MemberAnnouncement,
    MemberMetadata,
    Message,
    PortionMap,
    PortionReport,
    SetReport,
    decode,
    decode_control,
    header,
)
from connector.reader import read_until_end, standalone_consumer
from connector.sets import Windows

log = logging.getLogger(__name__)

Portion = tuple[str, int]


async def read_manifests(client: dict[str, Any], topic: str) -> dict[int, Manifest]:
    """Every committed manifest by set id (the first one written for an id wins)."""
    out: dict[int, Manifest] = {}
    async with standalone_consumer(client) as consumer:
        async for _tp, records in read_until_end(consumer, [TopicPartition(topic, 0)]):
            for r in records:
                try:
                    m = decode(Manifest, r.value, header(r.headers, SCHEMA_HEADER))
                except MalformedMessage as exc:
                    log.warning("skipping malformed record on %s at %d: %s", topic, r.offset, exc)
                    continue
                out.setdefault(m.set_id, m)
    return out


class ReportBook:
    """Valid reports by set and portion, and the maps that make them valid."""

    def __init__(self) -> None:
        self.maps: dict[int, PortionMap] = {}
        self.reports: dict[int, dict[Portion, tuple[SetReport, PortionReport]]] = defaultdict(dict)
        self._pending: list[SetReport] = []

    def add_map(self, m: PortionMap) -> None:
        self.maps[m.epoch] = m
        pending, self._pending = self._pending, []
        for r in pending:
            self.add_report(r)

    def add_report(self, report: SetReport) -> None:
        m = self.maps.get(report.epoch)
        if m is None:
            self._pending.append(report)  # its map is published, just not read yet
            return
        for pr in report.portions:
            entry = m.portion(pr.topic, pr.partition)
            if entry is None or entry.owner != report.member:
                log.warning(
                    "ignoring report of set %d for %s[%d] by %s: not its owner in epoch %d",
                    report.set_id,
                    pr.topic,
                    pr.partition,
                    report.member,
                    report.epoch,
                )
                continue
            have = self.reports[report.set_id].get((pr.topic, pr.partition))
            if have is None or have[0].epoch < report.epoch:
                self.reports[report.set_id][(pr.topic, pr.partition)] = (report, pr)

    @property
    def latest_map(self) -> PortionMap | None:
        return self.maps[max(self.maps)] if self.maps else None

    def forget_through(self, set_id: int) -> None:
        """A manifest covers these sets: their reports can no longer be the newest base."""
        for n in [n for n in self.reports if n <= set_id]:
            del self.reports[n]

    def latest(self, portion: Portion) -> tuple[int, PortionReport] | None:
        best: tuple[int, PortionReport] | None = None
        for set_id, by_portion in self.reports.items():
            got = by_portion.get(portion)
            if got is not None and (best is None or set_id > best[0]):
                best = (set_id, got[1])
        return best


async def read_reports(client: dict[str, Any], topic: str) -> ReportBook:
    book = ReportBook()
    async with standalone_consumer(client) as consumer:
        async for _tp, records in read_until_end(consumer, [TopicPartition(topic, 0)]):
            for r in records:
                file_control(book, r.value, r.headers)
    return book


def file_control(book: ReportBook, value: bytes | None, headers: Any) -> Message | None:
    """Decode one control record and file what the book keeps; None if unreadable."""
    try:
        msg = decode_control(value, headers)
    except MalformedMessage as exc:
        log.warning("skipping malformed control record: %s", exc)
        return None
    if isinstance(msg, PortionMap):
        book.add_map(msg)
    elif isinstance(msg, SetReport):
        book.add_report(msg)
    return msg


def plan_handover(
    m: PortionMap, joining: list[str], leaving: list[str], *, max_slots: int
) -> list[HandoverMove]:
    """The portions the next rebalance will move, predicted with the assignor's own ``plan``.

    Members are described as the map knows them and leavers are left out, exactly as the
    group will look once the joiners joined and the leavers left; a prediction that turns
    out wrong (another member fails meanwhile) only means that portion moves mid-set, which
    takeover handles like a failure.
    """
    topics = frozenset(p.topic for p in m.portions)

    def held(name: str, role: str) -> list[HeldPortion]:
        return [
            HeldPortion(topic=p.topic, partition=p.partition)
            for p in m.portions
            if getattr(p, role) == name
        ]

    members = {
        mm.name: Candidate(
            MemberMetadata(
                name=mm.name,
                slot=mm.slot,
                epoch=m.epoch,
                first_window=m.first_window,
                owned=held(mm.name, "owner"),
                mirrored=held(mm.name, "mirror"),
            ),
            topics,
        )
        for mm in m.members
        if mm.name not in leaving
    }
    for name in joining:
        members[name] = Candidate(MemberMetadata(name=name), topics)
    if not members:
        return []
    planned, _ = plan(
        members,
        [(p.topic, p.partition) for p in m.portions],
        coordinator=min(members),
        max_slots=max_slots,
    )
    moves = []
    for p in m.portions:
        entry = planned.portion(p.topic, p.partition)
        if entry is not None and entry.owner != p.owner:
            moves.append(
                HandoverMove(
                    topic=p.topic, partition=p.partition, from_member=p.owner, to_member=entry.owner
                )
            )
    return moves


class Coordinator:
    def __init__(
        self,
        *,
        group: str,
        member: str,
        client: dict[str, Any],
        producer_conf: dict[str, Any],
        control_topic: str,
        sets_topic: str,
        prefix: str,
        interval_ms: int,
        current_map: Callable[[], PortionMap | None],
        max_slots: int,
        request_fresh_ms: int,
        checkpoints: CheckpointSource = no_checkpoints,
    ) -> None:
        self._group = group
        self._member = member
        self._client = client
        self._conf = producer_conf
        self._control = control_topic
        self._sets = sets_topic
        self._prefix = prefix
        self._interval_ms = interval_ms
        self._current_map = current_map
        self._max_slots = max_slots
        self._fresh_ms = request_fresh_ms
        self._checkpoints = checkpoints
        self.last_committed = -1
        self.book = ReportBook()
        self.requests: dict[str, MemberAnnouncement] = {}
        self.handover: Handover | None = None

    async def run(self) -> None:
        producer = AsyncProducer(self._conf, transactional_id=f"{self._group}.coordinator")
        try:
            await producer.init_transactions()
            manifests = await read_manifests(self._client, self._sets)
            self.last_committed = max(manifests, default=-1)
            log.info("coordinator %s: resuming after set %d", self._member, self.last_committed)
            async with standalone_consumer(self._client) as consumer:
                tp = TopicPartition(self._control, 0)
                consumer.assign([tp])
                await consumer.seek_to_beginning(tp)
                while True:
                    batch = await consumer.getmany(tp, timeout_ms=200, max_records=5000)
                    for r in batch.get(tp, []):
                        msg = file_control(self.book, r.value, r.headers)
                        if isinstance(msg, MemberAnnouncement):
                            self.requests[msg.member] = msg
                        elif isinstance(msg, Handover):
                            self.handover = msg
                    while await self._commit_next(producer):
                        pass
                    await self._plan_membership(producer)
        finally:
            await producer.close()

    async def _plan_membership(self, producer: AsyncProducer) -> None:
        """Turn join and leave requests into one handover at the next reachable boundary.

        One change at a time: while a handover for the current map is pending, newer
        requests wait for the map it produces. A handover whose joiners never came (they
        died) lapses two sets after its boundary, and the next one supersedes it.
        """
        m = self._current_map()
        if m is None or m.first_window < 0 or not m.portions:
            return
        now = int(time.time() * 1000)
        fresh = {n: a for n, a in self.requests.items() if now - a.at_ms <= self._fresh_ms}
        names = {mm.name for mm in m.members}
        joining = sorted(n for n, a in fresh.items() if a.joining and n not in names)
        leaving = sorted(n for n, a in fresh.items() if a.leaving and n in names)
        if not joining and not leaving:
            return
        h = self.handover
        if h is not None and h.epoch == m.epoch and self.last_committed <= h.set_id + 2:
            return
        windows = Windows(self._interval_ms, m.first_window)
        # Owners must hear of the boundary before any record stamped after it exists.
        boundary = max(self.last_committed + 1, windows.set_at(now + 1000))
        handover = Handover(
            epoch=m.epoch,
            set_id=boundary,
            at_ms=now,
            coordinator=self._member,
            joining=joining,
            leaving=leaving,
            moves=plan_handover(m, joining, leaving, max_slots=self._max_slots),
            reason=", ".join([f"{n} joins" for n in joining] + [f"{n} leaves" for n in leaving]),
        )
        await producer.begin()
        await producer.send(
            Outgoing(self._control, handover.encode(), b"handover", headers=handover.headers())
        )
        await asyncio.wait_for(producer.commit(), 30)
        self.handover = handover
        log.info(
            "handover at set %d (%s): %d portions move",
            boundary,
            handover.reason,
            len(handover.moves),
        )

    async def _commit_next(self, producer: AsyncProducer) -> bool:
        m = self._current_map()
        if m is None or m.first_window < 0:
            return False
        self.book.add_map(m)
        n = self.last_committed + 1
        got = self.book.reports.get(n, {})
        if not m.portions or any((p.topic, p.partition) not in got for p in m.portions):
            return False
        windows = Windows(self._interval_ms, m.first_window)
        portions = []
        for p in sorted(m.portions, key=lambda p: (p.topic, p.partition)):
            report, pr = got[(p.topic, p.partition)]
            portions.append(
                ManifestPortion(
                    **pr.model_dump(),
                    backup_topic=f"{self._prefix}{pr.topic}",
                    owner=report.member,
                )
            )
        manifest = Manifest(
            set_id=n,
            group=self._group,
            window_start_ms=windows.start_ms(n),
            window_end_ms=windows.end_ms(n),
            committed_ms=int(time.time() * 1000),
            epoch=m.epoch,
            coordinator=self._member,
            members=[mm.name for mm in m.members],
            late=sum(p.late for p in portions),
            portions=portions,
            checkpoints=await self._checkpoints([(p.topic, p.partition) for p in portions]),
        )
        await producer.begin()
        await producer.send(
            Outgoing(self._sets, manifest.encode(), str(n).encode(), headers=manifest.headers())
        )
        await asyncio.wait_for(producer.commit(), 30)
        self.last_committed = n
        self.book.reports.pop(n, None)
        log.info(
            "committed set %d: %d records, %d late",
            n,
            sum(p.count for p in portions),
            manifest.late,
        )
        return True
