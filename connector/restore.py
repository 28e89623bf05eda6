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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from confluent_kafka import KafkaException
from rich.console import Console
from rich.table import Table

from connector.clients import Admin, AsyncProducer, Outgoing, TopicSpec
from connector.config import ClusterConfig, Settings
from connector.coordinator import read_manifests
from connector.errors import MalformedMessage, TandemError, TopicError, UsageError
from connector.messages import (
    SCHEMA_HEADER,
    Manifest,
    ManifestPortion,
    MirroredRecord,
    RestorePlan,
    decode,
    header,
)
from connector.mirror import read_copies
from connector.ranges import FETCH, BackupRecord, Headers, RangeCursor, set_records
from connector.reader import partition_ends, read_until_end, standalone_consumer
from connector.sets import checksum, record_fields
from connector.verify import ProgressCallback

log = logging.getLogger(__name__)

Portion = tuple[str, int]
Fields = tuple[bytes | None, bytes | None, Headers, int]
CHUNK = 2000  # records per send: bounds memory and makes progress and throttling smooth
CREATE_TIME = 0  # Kafka's timestamp type the restore writes; LogAppendTime would restamp


@dataclass(frozen=True)
class RestoreRequest:
    """What to restore and where; ``set_id`` and ``at_ms`` both None mean the last set."""

    target: ClusterConfig
    set_id: int | None = None
    at_ms: int | None = None
    topic_map: Mapping[str, str] = field(default_factory=dict)
    dry_run: bool = False
    force: bool = False
    include_unsecured: bool = False
    max_rate: float | None = None
    timeout_s: float = 60.0


@dataclass
class PartitionPlan:
    """One portion's restore: its sets in order, where they go, and how far it got."""

    portion: Portion
    target: Portion
    entries: list[tuple[int, ManifestPortion]]
    base: int = 0
    present: int = 0  # restored records already in the target (a resumed restore)
    unsecured: list[MirroredRecord] = field(default_factory=list)

    @property
    def committed(self) -> int:
        return sum(mp.count for _, mp in self.entries)

    @property
    def total(self) -> int:
        return self.committed + len(self.unsecured)

    @property
    def to_write(self) -> int:
        return self.total - self.present

    def to_dict(self) -> dict[str, Any]:
        return {
            "topic": self.portion[0],
            "partition": self.portion[1],
            "target_topic": self.target[0],
            "first_set": self.entries[0][0],
            "last_set": self.entries[-1][0],
            "cut": self.entries[-1][1].next_offset,
            "base": self.base,
            "records": self.total,
            "unsecured": len(self.unsecured),
            "already_present": self.present,
            "to_write": self.to_write,
        }


@dataclass(frozen=True)
class TranslatedOffset:
    group: str
    topic: str
    partition: int
    primary_offset: int
    from_set: int  # the manifest whose checkpoint this is
    target_topic: str
    target_offset: int


@dataclass
class RestoreResult:
    set_id: int
    window_end_ms: int
    dry_run: bool
    include_unsecured: bool
    partitions: list[PartitionPlan]
    offsets: list[TranslatedOffset]
    written: int = 0
    verified: int = 0
    problems: list[str] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def records(self) -> int:
        return sum(p.total for p in self.partitions)

    @property
    def unsecured(self) -> int:
        return sum(len(p.unsecured) for p in self.partitions)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "set_id": self.set_id,
            "window_end_ms": self.window_end_ms,
            "dry_run": self.dry_run,
            "consistent_cut": not self.unsecured,
            "records": self.records,
            "unsecured": self.unsecured,
            "written": self.written,
            "verified": self.verified,
            "elapsed_s": round(self.elapsed_s, 3),
            "problems": self.problems,
            "partitions": [p.to_dict() for p in self.partitions],
            "offsets": [vars(o) for o in self.offsets],
        }

    def summary(self) -> str:
        what = f"set {self.set_id} (T={_iso(self.window_end_ms)})"
        if self.dry_run:
            todo = sum(p.to_write for p in self.partitions)
            return f"dry run: restoring {what} would write {todo:,} records; nothing written"
        head = (
            f"restored {what}: {self.records:,} records in {len(self.partitions)} partitions "
            f"({self.written:,} written now) in {self.elapsed_s:.1f} s"
        )
        if not self.ok:
            return f"{head}: verification FAILED, {len(self.problems)} problem(s)"
        return f"{head}, verified against the manifests"


def parse_time(text: str) -> int:
    """Epoch milliseconds, or ISO-8601 (a time without a zone is taken as UTC)."""
    if text.isdigit():
        return int(text)
    try:
        dt = datetime.fromisoformat(text)
    except ValueError as exc:
        raise UsageError(
            f"--time {text!r} is neither epoch milliseconds nor ISO-8601 "
            "(e.g. 2026-01-31T12:00:00Z)"
        ) from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)


def parse_topic_map(pairs: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        src, sep, dst = pair.partition(":")
        if not sep or not src or not dst:
            raise UsageError(f"--topic-map {pair!r} is not SOURCE:TARGET")
        if src in out:
            raise UsageError(f"--topic-map names topic {src!r} twice")
        out[src] = dst
    return out


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def select_set(
    manifests: Mapping[int, Manifest],
    set_id: int | None,
    at_ms: int | None,
    include_unsecured: bool,
) -> Manifest:
    """The set to restore. ``--time`` picks the last set whose window ends at or before T:
    its records are exactly those stamped up to its window end, the state at that time."""
    ids = sorted(manifests)
    if not ids:
        raise UsageError("no committed set: there is nothing to restore yet")
    committed = f"committed sets are {ids[0]}..{ids[-1]}"
    if set_id is not None and at_ms is not None:
        raise UsageError("give --set or --time, not both")
    if set_id is not None:
        if set_id not in manifests:
            raise UsageError(f"set {set_id} does not exist: {committed}")
        chosen = manifests[set_id]
    elif at_ms is not None:
        before = [i for i in ids if manifests[i].window_end_ms <= at_ms]
        if not before:
            first = manifests[ids[0]]
            raise UsageError(
                f"no set ends at or before {_iso(at_ms)}: the first, set {first.set_id}, "
                f"ends at {_iso(first.window_end_ms)}"
            )
        chosen = manifests[before[-1]]
    else:
        chosen = manifests[ids[-1]]
    if include_unsecured and chosen.set_id != ids[-1]:
        raise UsageError(
            f"--include-unsecured continues after the last committed set ({ids[-1]}); "
            f"set {chosen.set_id} is not the last"
        )
    missing = sorted(set(range(ids[0], chosen.set_id + 1)) - set(ids))
    if missing:
        raise TandemError(
            f"sets {missing[:10]} have no manifest, so set {chosen.set_id} is no complete cut; "
            "run tandem verify"
        )
    return chosen


def _partition_plans(
    manifests: Mapping[int, Manifest], last: int, topic_map: Mapping[str, str]
) -> list[PartitionPlan]:
    entries: dict[Portion, list[tuple[int, ManifestPortion]]] = {}
    for sid in sorted(i for i in manifests if i <= last):
        for mp in manifests[sid].portions:
            entries.setdefault((mp.topic, mp.partition), []).append((sid, mp))
    unknown = sorted(set(topic_map) - {t for t, _ in entries})
    if unknown:
        raise UsageError(
            f"--topic-map names topic(s) {', '.join(unknown)}, which set {last} does not hold"
        )
    return [
        PartitionPlan(portion=(t, p), target=(topic_map.get(t, t), p), entries=e)
        for (t, p), e in sorted(entries.items())
    ]


def _checkpoints(
    manifests: Mapping[int, Manifest], last: int
) -> dict[tuple[str, Portion], tuple[int, int]]:
    """Per (group, portion), the newest checkpoint at or before set ``last``: (set, offset)."""
    out: dict[tuple[str, Portion], tuple[int, int]] = {}
    for sid in sorted(i for i in manifests if i <= last):
        for c in manifests[sid].checkpoints:
            out[(c.group, (c.topic, c.partition))] = (sid, c.offset)
    return out


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
    plans = _partition_plans(manifests, chosen.set_id, request.topic_map)
    checkpoints = _checkpoints(manifests, chosen.set_id)
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
        shapes = await _shapes(plans, backup_admin)
        target_counts = await target_admin.partition_counts()
        _check_partition_counts(shapes, target_counts, request.target.bootstrap_servers)
        if request.include_unsecured:
            await _add_unsecured(settings, plans)
        new_plans = await _place(settings, request, plans, shapes, target_counts)
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
            await _prepare_target(settings, request, shapes, target_counts, new_plans, target_admin)
            result.written = await _write_all(request, plans, reader, progress)
        result.verified = await _verify(request, plans, result.problems, progress)
        if result.ok and result.offsets:
            await _commit_offsets(result.offsets, target_admin)
    finally:
        await backup_admin.close()
        await target_admin.close()
    result.elapsed_s = time.monotonic() - started
    return result


async def _shapes(plans: list[PartitionPlan], backup_admin: Admin) -> dict[str, tuple[str, int]]:
    """Per target topic: its primary topic and partition count. The backup topic has the
    primary's partition count, so the primary cluster is not needed (it may be gone)."""
    counts = await backup_admin.partition_counts()
    out: dict[str, tuple[str, int]] = {}
    for plan in plans:
        backup_topic = plan.entries[-1][1].backup_topic
        n = counts.get(backup_topic)
        if n is None:
            raise TandemError(f"backup topic {backup_topic} does not exist")
        seen = out.setdefault(plan.target[0], (plan.portion[0], n))
        if seen[0] != plan.portion[0]:
            raise UsageError(
                f"--topic-map sends both {seen[0]} and {plan.portion[0]} to {plan.target[0]}"
            )
    return out


def _check_partition_counts(
    shapes: Mapping[str, tuple[str, int]], target_counts: Mapping[str, int], where: str
) -> None:
    for name, (source, n) in sorted(shapes.items()):
        have = target_counts.get(name)
        if have is not None and have != n:
            raise UsageError(
                f"target topic {name} on {where} has {have} partitions, but {source} has {n}: "
                "a restore keeps every record in its partition; delete the topic or choose "
                "another with --topic-map"
            )


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


async def _place(
    settings: Settings,
    request: RestoreRequest,
    plans: list[PartitionPlan],
    shapes: Mapping[str, tuple[str, int]],
    target_counts: Mapping[str, int],
) -> list[RestorePlan]:
    """Set each partition's base and what is already there; the plans still to be written.

    The target's own plan makes a non-empty topic ours; without one it is foreign data.
    """
    existing = await _read_restore_plans(settings, request.target, target_counts)
    tps = [TopicPartition(t, p) for t in shapes if t in target_counts for p in range(shapes[t][1])]
    ends: dict[TopicPartition, tuple[int, int]] = {}
    if tps:  # (a consumer stopped before its first await fails in aiokafka's close)
        async with standalone_consumer(request.target.aiokafka(), **FETCH) as consumer:
            ends = await partition_ends(consumer, tps, timeout_s=request.timeout_s)
    by_target: dict[str, list[PartitionPlan]] = {}
    for plan in plans:
        by_target.setdefault(plan.target[0], []).append(plan)
    new: list[RestorePlan] = []
    for name, (source, n) in sorted(shapes.items()):
        span = {p: ends.get(TopicPartition(name, p), (0, 0)) for p in range(n)}
        mine = existing.get(name)
        if mine is not None and (mine.group, mine.topic, len(mine.bases)) == (
            settings.group,
            source,
            n,
        ):
            bases = list(mine.bases)
        else:
            held = {p: e - s for p, (s, e) in span.items() if e > s}
            if held and not request.force:
                where = ", ".join(f"[{p}] {k:,}" for p, k in sorted(held.items())[:8])
                whose = (
                    f"restored from group {mine.group!r} topic {mine.topic}"
                    if mine is not None
                    else "not written by a restore of this group"
                )
                raise UsageError(
                    f"target topic {name} is not empty ({sum(held.values()):,} records: "
                    f"{where}) and was {whose}; refusing to mix it with the restore. Restore "
                    "into another topic (--topic-map) or append after it with --force"
                )
            bases = [span[p][1] for p in range(n)]
            new.append(
                RestorePlan(
                    group=settings.group,
                    topic=source,
                    target_topic=name,
                    bases=bases,
                    created_ms=int(time.time() * 1000),
                )
            )
        for plan in by_target[name]:
            partition = plan.target[1]
            plan.base = bases[partition]
            end = span[partition][1]
            if end < plan.base:
                raise TandemError(
                    f"target {name}[{partition}] ends at offset {end}, before the restore's "
                    f"base {plan.base}: records were deleted; restore into a fresh topic"
                )
            plan.present = end - plan.base
            if plan.present > plan.total:
                raise UsageError(
                    f"target {name}[{partition}] already holds {plan.present:,} restored "
                    f"records, more than the {plan.total:,} of this restore: it was restored "
                    "from a later set; restore into a fresh topic (--topic-map)"
                )
    return new


def _plans_topic(settings: Settings) -> str:
    return f"{settings.group}.restore"


async def _read_restore_plans(
    settings: Settings, target: ClusterConfig, target_counts: Mapping[str, int]
) -> dict[str, RestorePlan]:
    topic = _plans_topic(settings)
    out: dict[str, RestorePlan] = {}
    if topic not in target_counts:
        return out
    async with standalone_consumer(target.aiokafka()) as consumer:
        async for _tp, records in read_until_end(consumer, [TopicPartition(topic, 0)]):
            for r in records:
                try:
                    plan = decode(RestorePlan, r.value, header(list(r.headers), SCHEMA_HEADER))
                except MalformedMessage as exc:
                    log.warning("skipping malformed record on %s at %d: %s", topic, r.offset, exc)
                    continue
                out[plan.target_topic] = plan
    return out


async def _prepare_target(
    settings: Settings,
    request: RestoreRequest,
    shapes: Mapping[str, tuple[str, int]],
    target_counts: Mapping[str, int],
    new_plans: list[RestorePlan],
    admin: Admin,
) -> None:
    """Create missing topics, then record new plans: a plan is written (and acknowledged)
    before the first record, so a crash at any later point leaves a target a rerun owns."""
    specs = [TopicSpec(n, k) for n, (_, k) in sorted(shapes.items()) if n not in target_counts]
    if new_plans:
        specs.append(TopicSpec(_plans_topic(settings), 1, (("retention.ms", "-1"),)))
    await admin.ensure_topics(specs)
    if not new_plans:
        return
    producer = AsyncProducer(request.target.confluent())
    try:
        await producer.send_many(
            [
                Outgoing(
                    _plans_topic(settings),
                    p.encode(),
                    p.target_topic.encode(),
                    partition=0,
                    headers=p.headers(),
                )
                for p in new_plans
            ]
        )
    finally:
        await producer.close()


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
    """The target offset of primary ``offset``: base + restored records stamped below it."""
    below = 0
    for sid, mp in plan.entries:
        if offset >= mp.next_offset:
            below += mp.count
            continue
        if offset > mp.first_offset:
            records = await reader.read(sid, mp)
            below += sum(1 for r in records if (r.primary_offset or 0) < offset)
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


async def _commit_offsets(offsets: list[TranslatedOffset], admin: Admin) -> None:
    by_group: dict[str, dict[Portion, int]] = {}
    for o in offsets:
        by_group.setdefault(o.group, {})[(o.target_topic, o.partition)] = o.target_offset
    for group, translated in sorted(by_group.items()):
        try:
            await admin.commit_group_offsets(group, translated)
        except KafkaException as exc:
            raise TandemError(
                f"cannot write offsets of group {group!r} on the target (stop its consumers "
                f"there first): {exc}"
            ) from exc


# --------------------------------------------------------------------------- output


def render(result: RestoreResult, console: Console) -> None:
    """The per-partition table, translated offsets, problems, and the summary line."""
    table = Table(
        title=f"restore of set {result.set_id}" + (" (dry run)" if result.dry_run else "")
    )
    for col in ("portion", "target", "sets", "cut", "records", "present", "to write"):
        table.add_column(col, justify="left" if col in ("portion", "target") else "right")
    if result.include_unsecured:
        table.add_column("unsecured", justify="right", style="yellow")
    for p in result.partitions:
        row = [
            f"{p.portion[0]}[{p.portion[1]}]",
            f"{p.target[0]}[{p.target[1]}] @{p.base}",
            f"{p.entries[0][0]}..{p.entries[-1][0]}",
            str(p.entries[-1][1].next_offset),
            f"{p.total:,}",
            f"{p.present:,}",
            f"{p.to_write:,}",
        ]
        if result.include_unsecured:
            row.append(f"{len(p.unsecured):,}")
        table.add_row(*row)
    console.print(table)
    if result.offsets:
        offsets = Table(title="consumer offsets" + (" (not written)" if result.dry_run else ""))
        for col in ("group", "portion", "checkpoint set", "primary offset", "target offset"):
            offsets.add_column(col)
        for o in result.offsets:
            offsets.add_row(
                o.group,
                f"{o.topic}[{o.partition}]",
                str(o.from_set),
                str(o.primary_offset),
                f"{o.target_topic}[{o.partition}] {o.target_offset}",
            )
        console.print(offsets)
    for problem in result.problems:
        console.print(f"problem: {problem}", style="bold red", highlight=False)
    if result.unsecured:
        console.print(
            f"includes {result.unsecured:,} UNSECURED record(s) past set {result.set_id}'s cut: "
            "the most data there is, but not a consistent cut",
            style="bold yellow",
            highlight=False,
        )
    console.print(result.summary(), style="green" if result.ok else "bold red", highlight=False)


__all__ = [
    "PartitionPlan",
    "RestoreRequest",
    "RestoreResult",
    "TranslatedOffset",
    "parse_time",
    "parse_topic_map",
    "render",
    "restore",
    "select_set",
]
