"""``tandem restore``: write a committed set back to Kafka, as a consistent cut.

Restoring set N writes, per portion, the records of every set up to N, read from exactly the
manifests' backup ranges (``connector.ranges``), to a target topic with the same partition
number, with key, value, original headers and timestamp; the ``tandem.*`` headers are
dropped, so each restored record equals its primary record. Nothing past set N's cut is
written: restoring set N gives every partition the primary's prefix at N's cut, and all
partitions the same point in time. The primary cluster is not needed.

Resuming without transactions. Transaction markers would take offsets in the target, and
restored offsets must be dense: the target offset of the i-th restored record of a
partition is ``base + i``, which is what makes offset translation exact. So the restore
writes with an idempotent, ordered producer and no transaction, and a partition's progress
is simply how many records it holds past its base. Before writing any record the restore
puts a ``RestorePlan`` (group, primary topic, base per partition) in ``<group>.restore`` on
the target. A rerun that finds its plan continues at ``end - base``; any other non-empty
target is someone else's data and is refused unless ``--force``, which appends after it
(the plan then records those ends as bases). Because the records of set N are a prefix of
those of set N+1, a target restored to set N can later be extended to a later set.

Consumer offsets. Each manifest carries the application groups' committed primary offsets
(``connector.checkpoints``). For restore to set N, each group's newest checkpoint at or
before N is translated: target offset = base + the number of restored records whose primary
offset is below the committed one. Primary offsets have gaps (transaction markers, compacted
records) and the target's do not; counting records, not offsets, bridges the two. An offset
at or past the cut maps to the end of the restored partition.

The restore ends by reading the target back and checking each set's slice of each partition
against the manifest: count and checksum (key, value, original headers, timestamp); group
offsets are written only after that check passes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import replace

from aiokafka import AIOKafkaConsumer, TopicPartition
from confluent_kafka import KafkaException

from connector.clients import Admin, AsyncProducer, Outgoing
from connector.config import Settings
from connector.coordinator import read_manifests
from connector.errors import TandemError, TopicError, UsageError
from connector.messages import ManifestPortion
from connector.mirror import read_copies
from connector.ranges import FETCH, BackupRecord, Headers, RangeCursor, set_records
from connector.reader import read_until_end, standalone_consumer
from connector.restore_plan import (
    PartitionPlan,
    Portion,
    RestoreRequest,
    RestoreResult,
    TranslatedOffset,
    checkpoints_at,
    partition_plans,
    select_set,
)
from connector.restore_target import check_partition_counts, place, prepare_target, target_shapes
from connector.sets import checksum, record_fields
from connector.verify import ProgressCallback

log = logging.getLogger(__name__)

Fields = tuple[bytes | None, bytes | None, Headers, int]
CHUNK = 2000  # records per send: bounds memory and makes progress and throttling smooth
CREATE_TIME = 0  # Kafka's timestamp type the restore writes; LogAppendTime would restamp


class _BackupReader:
    """A set's records of one portion, from its manifest range; the one consumer moves on
    from portion to portion as the restore does."""

    def __init__(self, consumer: AIOKafkaConsumer, timeout_s: float) -> None:
        self._consumer = consumer
        self._timeout_s = timeout_s
        self._cursor: RangeCursor | None = None

    async def read(self, set_id: int, mp: ManifestPortion) -> list[BackupRecord]:
        if mp.count == 0:
            return []
        tp = TopicPartition(mp.backup_topic, mp.partition)
        if self._cursor is None or self._cursor.tp != tp:
            self._cursor = RangeCursor(self._consumer, tp, self._timeout_s)
            self._cursor.start()
        raw, complete = await self._cursor.take(mp.backup_first_offset, mp.backup_next_offset)
        records, _leftovers = set_records(raw, set_id, mp.owner)
        if not complete or len(records) != mp.count:
            raise TandemError(
                f"set {set_id}, {mp.topic}[{mp.partition}]: backup range "
                f"[{mp.backup_first_offset}, {mp.backup_next_offset}) of "
                f"{mp.backup_topic}[{mp.partition}] holds {len(records)} of the manifest's "
                f"{mp.count} records; run tandem verify"
            )
        return records


class _Pacer:
    """Keeps the write rate at or below ``rate`` records/s (None: as fast as acks come), so a
    restore into a live cluster does not crowd out its other clients."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._start = time.monotonic()
        self._sent = 0

    @property
    def chunk(self) -> int:
        return CHUNK if self.rate is None else max(1, min(CHUNK, int(self.rate / 10)))

    async def take(self, n: int) -> None:
        if self.rate is None:
            return
        self._sent += n
        ahead = self._sent / self.rate - (time.monotonic() - self._start)
        if ahead > 0:
            await asyncio.sleep(ahead)


async def restore(
    settings: Settings, request: RestoreRequest, progress: ProgressCallback | None = None
) -> RestoreResult:
    """Restore a set (see the module docstring). Raises UsageError for a request that cannot
    be carried out (checked before anything is written), TandemError for runtime failures;
    a verification mismatch is in ``result.problems``."""
    started = time.monotonic()
    backup = settings.backup_cluster
    try:
        manifests = await read_manifests(backup.aiokafka(), settings.sets_topic)
    except TopicError as exc:
        raise UsageError(
            f"group {settings.group!r} has no sets topic on {backup.bootstrap_servers}: "
            "it has never committed a set (or the config names another cluster or group)"
        ) from exc
    chosen = select_set(manifests, request.set_id, request.at_ms, request.include_unsecured)
    plans = partition_plans(manifests, chosen.set_id, request.topic_map)
    checkpoints = checkpoints_at(manifests, chosen.set_id)
    result = RestoreResult(
        set_id=chosen.set_id,
        window_end_ms=chosen.window_end_ms,
        dry_run=request.dry_run,
        include_unsecured=request.include_unsecured,
        partitions=plans,
        offsets=[],
    )
    backup_admin = Admin(backup.confluent(), timeout_s=min(request.timeout_s, 15.0))
    target_admin = Admin(request.target.confluent(), timeout_s=min(request.timeout_s, 15.0))
    try:
        shapes = await target_shapes(plans, backup_admin)
        target_counts = await target_admin.partition_counts()
        check_partition_counts(shapes, target_counts, request.target.bootstrap_servers)
        if request.include_unsecured:
            await _add_unsecured(settings, plans)
        new_plans = await place(settings, request, plans, shapes, target_counts)
        async with standalone_consumer(backup.aiokafka(), **FETCH) as consumer:
            reader = _BackupReader(consumer, request.timeout_s)
            by_portion = {p.portion: p for p in plans}
            for (group, portion), (sid, offset) in sorted(checkpoints.items()):
                plan = by_portion.get(portion)
                if plan is not None:
                    target = await _translate(plan, offset, reader)
                    result.offsets.append(
                        TranslatedOffset(group, *portion, offset, sid, plan.target[0], target)
                    )
            if request.dry_run:
                result.elapsed_s = time.monotonic() - started
                return result
            await prepare_target(settings, request, shapes, target_counts, new_plans, target_admin)
            result.written = await _write_all(request, plans, reader, progress)
        result.verified = await _verify(request, plans, result.problems, progress)
        if result.ok and result.offsets:
            result.offsets = await _commit_offsets(result.offsets, target_admin)
    finally:
        await backup_admin.close()
        await target_admin.close()
    result.elapsed_s = time.monotonic() - started
    return result


async def _add_unsecured(settings: Settings, plans: list[PartitionPlan]) -> None:
    """Mirrored copies past the last set's cut, while they continue it without a gap."""
    copies = await read_copies(
        settings.backup_cluster.aiokafka(),
        settings.mirror_topic,
        settings.mirror.max_workers,
        [p.portion for p in plans],
    )
    for plan in plans:
        last = plan.entries[-1][1]
        seq, offset = last.last_seq + 1, last.next_offset
        for rec in copies.get(plan.portion, []):
            if rec.seq < seq:
                continue
            if rec.seq != seq or rec.offset < offset:
                break
            plan.unsecured.append(rec)
            seq, offset = rec.seq + 1, rec.offset + 1


async def _write_all(
    request: RestoreRequest,
    plans: list[PartitionPlan],
    reader: _BackupReader,
    progress: ProgressCallback | None,
) -> int:
    """Write what each partition still lacks, in primary order, skipping what is there."""
    total = sum(p.to_write for p in plans)
    done = 0
    pacer = _Pacer(request.max_rate)
    producer = AsyncProducer(request.target.confluent())

    async def send(plan: PartitionPlan, records: Sequence[Fields]) -> None:
        nonlocal done
        for i in range(0, len(records), pacer.chunk):
            chunk = records[i : i + pacer.chunk]
            await pacer.take(len(chunk))
            await producer.send_many(
                [
                    Outgoing(
                        plan.target[0],
                        value,
                        key,
                        partition=plan.target[1],
                        headers=headers,
                        timestamp=ts,
                    )
                    for key, value, headers, ts in chunk
                ]
            )
            done += len(chunk)
            if progress is not None:
                progress(done, total, f"write {plan.target[0]}[{plan.target[1]}]")

    try:
        for plan in plans:
            skip = plan.present
            for sid, mp in plan.entries:
                if skip >= mp.count:
                    skip -= mp.count
                    continue
                records = await reader.read(sid, mp)
                await send(plan, [(r.key, r.value, r.headers, r.timestamp) for r in records[skip:]])
                skip = 0
            await send(plan, [record_fields(r) for r in plan.unsecured[skip:]])
    finally:
        await producer.close()
    return done


async def _translate(plan: PartitionPlan, offset: int, reader: _BackupReader) -> int:
    """The target offset of primary ``offset``: base + restored records whose primary offset
    is below it."""
    below = 0
    for sid, mp in plan.entries:
        if offset >= mp.next_offset:
            below += mp.count
            continue
        if offset > mp.first_offset:
            records = await reader.read(sid, mp)
            below += sum(
                1 for r in records if r.primary_offset is not None and r.primary_offset < offset
            )
        return plan.base + below
    below += sum(1 for r in plan.unsecured if r.offset < offset)
    return plan.base + below


async def _verify(
    request: RestoreRequest,
    plans: list[PartitionPlan],
    problems: list[str],
    progress: ProgressCallback | None,
) -> int:
    """Read the target back from each base: each set's slice must match its manifest's
    count and checksum, the unsecured tail the checksum of its copies, nothing more."""
    total = sum(p.total for p in plans)
    done = 0
    async with standalone_consumer(request.target.aiokafka(), **FETCH) as consumer:
        for plan in plans:
            slices: list[tuple[str, int, str]] = [
                (f"set {sid}", mp.count, mp.checksum) for sid, mp in plan.entries if mp.count
            ]
            if plan.unsecured:
                slices.append(
                    (
                        "unsecured",
                        len(plan.unsecured),
                        checksum(record_fields(r) for r in plan.unsecured),
                    )
                )
            name = f"{plan.target[0]}[{plan.target[1]}]"
            tp = TopicPartition(*plan.target)
            held: list[Fields] = []
            extra = restamped = 0
            at = 0
            async for _tp, records in read_until_end(
                consumer, [tp], start={tp: plan.base}, timeout_s=request.timeout_s
            ):
                for r in records:
                    if r.timestamp_type != CREATE_TIME:
                        restamped += 1
                    if at >= len(slices):
                        extra += 1
                        continue
                    held.append((r.key, r.value, list(r.headers), r.timestamp))
                    label, count, digest = slices[at]
                    if len(held) == count:
                        if checksum(held) != digest:
                            problems.append(f"{name}: {label} differs from its manifest")
                        held = []
                        at += 1
                done += len(records)
                if progress is not None:
                    progress(done, total, f"verify {name}")
            if at < len(slices):
                missing = sum(c for _, c, _ in slices[at:]) - len(held)
                problems.append(f"{name}: {missing:,} restored record(s) missing")
            if extra:
                problems.append(f"{name}: {extra:,} record(s) past the restored ones")
            if restamped:
                problems.append(
                    f"{name}: {restamped:,} record(s) not stamped with CreateTime "
                    "(is the target topic LogAppendTime?): timestamps were not kept"
                )
    return done


async def _commit_offsets(offsets: list[TranslatedOffset], admin: Admin) -> list[TranslatedOffset]:
    """Write translated offsets where the group has none on the target yet, or the same.

    A group that already committed another offset there has consumed on the target since
    (or someone set it on purpose): a rerun of the restore must not rewind it.
    """
    by_group: dict[str, list[TranslatedOffset]] = {}
    for o in offsets:
        by_group.setdefault(o.group, []).append(o)
    out: list[TranslatedOffset] = []
    for group, mine in sorted(by_group.items()):
        try:
            have = await admin.group_offsets(group, [(o.target_topic, o.partition) for o in mine])
            todo: dict[Portion, int] = {}
            for o in mine:
                where = (o.target_topic, o.partition)
                if have.get(where, o.target_offset) == o.target_offset:
                    todo[where] = o.target_offset
                    out.append(o)
                else:
                    out.append(replace(o, kept=have[where]))
            if todo:
                await admin.commit_group_offsets(group, todo)
        except (KafkaException, TimeoutError) as exc:
            raise TandemError(
                f"cannot write offsets of group {group!r} on the target (stop its consumers "
                f"there first): {exc}"
            ) from exc
    return out


__all__ = ["restore"]
