"""``tandem verify``: check every committed set against primary and backup, from outside.

Three sources are read independently, never by asking a worker: the manifests in
``<group>.sets``, the primary partitions, and the backup partitions. Each guarantee of
DESIGN.md that an outsider can check becomes a check here:

- manifests: set ids contiguous, one manifest per set id, windows moving forward;
- prefix cut, forward only: per portion, set N starts where set N-1 ended, and sequence
  numbers continue across sets;
- no loss, exactly once, primary order, byte-identical: the primary records inside the
  set's cut equal, one to one and in order, the set's records inside the manifest's backup
  range (records of other owners or other sets in that range are leftovers and ignored);
- the manifest's counts, sequence range and checksum match the records;
- consistency: nothing in set N is stamped after T_N, and the late count is right;
- the primary group's committed offsets are set boundaries, never beyond the last cut.

Memory stays bounded by one (set, portion) at a time: each partition is read forward once
by a cursor that hands out one offset range after another.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import ConsumerRecord, TopicPartition
from confluent_kafka import KafkaException
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from connector.clients import Admin
from connector.config import Settings
from connector.errors import BrokerUnavailable, MalformedMessage, TopicError
from connector.messages import SCHEMA_HEADER, Manifest, ManifestPortion, decode, header
from connector.ranges import FETCH, BackupRecord, RangeCursor, set_records
from connector.reader import read_until_end, standalone_consumer
from connector.sets import OFFSET_HEADER, checksum

log = logging.getLogger(__name__)

Portion = tuple[str, int]
ProgressCallback = Callable[[int, int, str], None]
"""``progress(done, total, what)``: called after each (set, portion) is compared."""

MAX_LISTED = 10  # offsets named in one problem message; the count is always exact


@dataclass(frozen=True)
class Problem:
    set_id: int | None
    portion: Portion | None
    kind: str
    message: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "set_id": self.set_id,
            "topic": self.portion[0] if self.portion else None,
            "partition": self.portion[1] if self.portion else None,
            "kind": self.kind,
            "message": self.message,
        }


@dataclass
class PortionSummary:
    """What was checked of one portion: from where, up to where, how much."""

    first_set: int
    last_set: int
    first_offset: int
    next_offset: int
    earliest_offset: int | None = None
    records: int = 0
    ignored: int = 0  # leftovers in backup ranges (other owner or other set), not counted
    unverifiable: int = 0  # backed up, but gone from primary (retention): not compared


@dataclass
class VerifyResult:
    sets_checked: int = 0
    records_checked: int = 0
    first_set: int | None = None
    last_set: int | None = None
    problems: list[Problem] = field(default_factory=list)
    portions: dict[Portion, PortionSummary] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def kinds(self) -> Counter[str]:
        return Counter(p.kind for p in self.problems)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "sets_checked": self.sets_checked,
            "records_checked": self.records_checked,
            "first_set": self.first_set,
            "last_set": self.last_set,
            "problems": [p.to_dict() for p in self.problems],
            "portions": [
                {"topic": t, "partition": p, **vars(s)}
                for (t, p), s in sorted(self.portions.items())
            ],
        }

    def to_json(self) -> dict[str, Any]:
        """The same as ``to_dict``: plain JSON-serialisable data."""
        return self.to_dict()

    def summary(self) -> str:
        what = f"verified {self.sets_checked:,} sets, {self.records_checked:,} records"
        if self.ok:
            return f"{what}: OK"
        n = len(self.problems)
        return f"{what}: {n:,} problem{'s' if n != 1 else ''}"


def _name(portion: Portion) -> str:
    return f"{portion[0]}[{portion[1]}]"


def _offsets(offsets: Sequence[int]) -> str:
    shown = ", ".join(str(o) for o in offsets[:MAX_LISTED])
    more = len(offsets) - MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


class _Problems:
    def __init__(self, result: VerifyResult) -> None:
        self.result = result

    def add(self, set_id: int | None, portion: Portion | None, kind: str, text: str) -> None:
        where = []
        if set_id is not None:
            where.append(f"set {set_id}")
        if portion is not None:
            where.append(_name(portion))
        prefix = ", ".join(where)
        message = f"{prefix}: {text}" if prefix else text
        self.result.problems.append(Problem(set_id, portion, kind, message))


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _ManifestRecord:
    offset: int
    manifest: Manifest


async def _read_manifests(
    settings: Settings, problems: _Problems, timeout_s: float
) -> list[_ManifestRecord]:
    topic = settings.sets_topic
    out: list[_ManifestRecord] = []
    async with standalone_consumer(settings.backup_cluster.aiokafka()) as consumer:
        try:
            async for _tp, records in read_until_end(
                consumer, [TopicPartition(topic, 0)], timeout_s=timeout_s
            ):
                for r in records:
                    try:
                        m = decode(Manifest, r.value, header(list(r.headers), SCHEMA_HEADER))
                    except MalformedMessage as exc:
                        problems.add(
                            None,
                            None,
                            "malformed-manifest",
                            f"record at offset {r.offset} of {topic} is not a manifest: {exc}",
                        )
                        continue
                    if r.key != str(m.set_id).encode():
                        problems.add(
                            m.set_id,
                            None,
                            "manifest-key",
                            f"manifest at offset {r.offset} of {topic} has key {r.key!r}, "
                            f"expected {str(m.set_id).encode()!r}",
                        )
                    out.append(_ManifestRecord(r.offset, m))
        except TopicError as exc:
            raise TopicError(
                f"topic {topic} does not exist on {settings.backup_cluster.bootstrap_servers}: "
                f"group {settings.group!r} has never committed a set (or the backup cluster "
                "or group name is wrong)"
            ) from exc
    return out


# --------------------------------------------------------------------------- checks


def _manifest_checks(manifests: list[_ManifestRecord], problems: _Problems) -> dict[int, Manifest]:
    """One manifest per set id (the first written), ids contiguous, windows forward."""
    by_id: dict[int, Manifest] = {}
    where: dict[int, int] = {}
    previous_id: int | None = None
    for mr in manifests:
        m = mr.manifest
        if m.set_id in by_id:
            if by_id[m.set_id] == m:
                problems.add(
                    m.set_id,
                    None,
                    "duplicate-manifest",
                    f"written twice (offsets {where[m.set_id]} and {mr.offset} of the sets "
                    "topic), identical",
                )
            else:
                diffs = _manifest_diff(by_id[m.set_id], m)
                problems.add(
                    m.set_id,
                    None,
                    "manifest-conflict",
                    f"two different manifests (offsets {where[m.set_id]} and {mr.offset} of "
                    f"the sets topic): {diffs}; checking the first",
                )
            continue
        if previous_id is not None and m.set_id < previous_id:
            problems.add(
                m.set_id,
                None,
                "manifest-order",
                f"committed after set {previous_id} (offset {mr.offset} of the sets topic)",
            )
        previous_id = m.set_id if previous_id is None else max(previous_id, m.set_id)
        by_id[m.set_id] = m
        where[m.set_id] = mr.offset
    ids = sorted(by_id)
    prev: Manifest | None = None
    for sid in ids:
        m = by_id[sid]
        if prev is not None and sid != prev.set_id + 1:
            missing = list(range(prev.set_id + 1, sid))
            problems.add(
                sid,
                None,
                "set-gap",
                f"set id(s) {_offsets(missing)} have no manifest (set ids must be contiguous)",
            )
        if m.window_end_ms < m.window_start_ms:
            problems.add(
                sid,
                None,
                "window",
                f"window ends ({m.window_end_ms}) before it starts ({m.window_start_ms})",
            )
        if prev is not None and m.window_end_ms <= prev.window_end_ms:
            problems.add(
                sid,
                None,
                "window",
                f"window end T={m.window_end_ms} does not follow set {prev.set_id}'s "
                f"T={prev.window_end_ms}",
            )
        total = sum(p.late for p in m.portions)
        if m.late != total:
            problems.add(
                sid,
                None,
                "late-count",
                f"manifest says {m.late} late records, its portions sum to {total}",
            )
        seen: set[Portion] = set()
        for p in m.portions:
            portion = (p.topic, p.partition)
            if portion in seen:
                problems.add(sid, portion, "manifest-conflict", "portion listed twice")
            seen.add(portion)
        prev = m
    return by_id


def _manifest_diff(a: Manifest, b: Manifest) -> str:
    da, db = a.model_dump(), b.model_dump()
    fields = [k for k in da if k != "portions" and da[k] != db[k]]
    pa = {(p.topic, p.partition): p for p in a.portions}
    pb = {(p.topic, p.partition): p for p in b.portions}
    for portion in sorted(set(pa) | set(pb)):
        x, y = pa.get(portion), pb.get(portion)
        if x is None or y is None:
            fields.append(f"{_name(portion)} only in one")
            continue
        dx, dy = x.model_dump(), y.model_dump()
        for k in dx:
            if dx[k] != dy[k]:
                fields.append(f"{_name(portion)} {k} {dx[k]} vs {dy[k]}")
    return "; ".join(fields) or "no field differs"


def _compare(
    set_id: int,
    portion: Portion,
    mp: ManifestPortion,
    primary: list[ConsumerRecord[bytes, bytes]],
    primary_complete: bool,
    backup: list[BackupRecord],
    backup_complete: bool,
    t_end: int,
    t_before: int | None,
    problems: _Problems,
    earliest: int = 0,
) -> int:
    """Compare one set's records of one portion: primary range against backup range.

    Primary records below ``earliest`` are gone (retention); backup records for them are
    checked only against the manifest. Returns how many records could not be compared.
    """
    truncated = mp.first_offset < earliest
    unverifiable: list[BackupRecord] = []

    def add(kind: str, text: str) -> None:
        problems.add(set_id, portion, kind, text)

    if not primary_complete:
        add(
            "not-prefix",
            f"cut [{mp.first_offset}, {mp.next_offset}) reaches past the readable end of the "
            "primary partition",
        )
    if not backup_complete:
        add(
            "missing",
            f"backup range [{mp.backup_first_offset}, {mp.backup_next_offset}) of "
            f"{mp.backup_topic}[{mp.partition}] reaches past the end of the backup partition",
        )
    position = {r.offset: i for i, r in enumerate(primary)}
    seen: set[int] = set()
    duplicates: list[int] = []
    out_of_order: list[int] = []
    extra: list[int] = []
    bad_offset: list[int] = []
    bad_seq: list[str] = []
    altered: dict[str, list[int]] = {}
    last = -1
    for b in backup:
        o = b.primary_offset
        if o is None:
            bad_offset.append(b.offset)
            continue
        if o in seen:
            duplicates.append(o)
            continue
        seen.add(o)
        if o < last:
            out_of_order.append(o)
        last = max(last, o)
        if o < earliest and mp.first_offset <= o:
            unverifiable.append(b)
            want = mp.first_seq + len(seen) - 1
            if b.seq != want:
                bad_seq.append(f"offset {o} has seq {b.seq}, expected {want}")
            continue
        i = position.get(o)
        if i is None:
            extra.append(o)
            continue
        want_seq = mp.first_seq + i + (len(unverifiable) if truncated else 0)
        if b.seq != want_seq:
            bad_seq.append(f"offset {o} has seq {b.seq}, expected {want_seq}")
        r = primary[i]
        for name, ok in (
            ("key", b.key == r.key),
            ("value", b.value == r.value),
            ("headers", b.headers == list(r.headers)),
            ("timestamp", b.timestamp == r.timestamp),
        ):
            if not ok:
                altered.setdefault(name, []).append(o)
    missing = [r.offset for r in primary if r.offset not in seen]
    if truncated:
        # the sequence numbers below were counted from the first record still in primary
        bad_seq = bad_seq if not missing and len(seen) == mp.count else []
    if missing:
        add(
            "missing",
            f"{len(missing)} primary record(s) not in backup: offsets {_offsets(missing)}",
        )
    if duplicates:
        add(
            "duplicate",
            f"{len(duplicates)} extra backup copies of primary offsets {_offsets(duplicates)} "
            f"in {mp.backup_topic}[{mp.partition}]",
        )
    if out_of_order:
        add(
            "order",
            f"backup holds primary offsets {_offsets(out_of_order)} after later offsets "
            "(not in primary order)",
        )
    for name, offs in altered.items():
        add(
            "altered",
            f"{name} differs from primary for {len(offs)} record(s): offsets {_offsets(offs)}",
        )
    if extra:
        add(
            "extra",
            f"{len(extra)} backup record(s) of this set carry primary offsets outside the cut "
            f"[{mp.first_offset}, {mp.next_offset}): {_offsets(extra)}",
        )
    if bad_offset:
        add(
            "header",
            f"{len(bad_offset)} backup record(s) without a readable {OFFSET_HEADER} header at "
            f"backup offsets {_offsets(bad_offset)}",
        )
    if bad_seq:
        shown = "; ".join(bad_seq[:MAX_LISTED])
        add("seq", f"{len(bad_seq)} record(s) with the wrong sequence number: {shown}")

    # counts and the manifest's own arithmetic
    if mp.count != len(primary) and not truncated:
        add(
            "count",
            f"manifest count {mp.count}, primary holds {len(primary)} records in "
            f"[{mp.first_offset}, {mp.next_offset})",
        )
    distinct = len(seen)
    if mp.count != distinct:
        add(
            "count",
            f"manifest count {mp.count}, backup range [{mp.backup_first_offset}, "
            f"{mp.backup_next_offset}) holds {distinct} distinct records of this set",
        )
    if mp.last_seq != mp.first_seq + mp.count - 1:
        add(
            "seq",
            f"last_seq {mp.last_seq} != first_seq {mp.first_seq} + count {mp.count} - 1",
        )
    if mp.count == 0 and (mp.backup_first_offset, mp.backup_next_offset) != (-1, -1):
        add(
            "manifest",
            f"empty set with backup range [{mp.backup_first_offset}, {mp.backup_next_offset}) "
            "(expected -1, -1)",
        )
    if mp.count > 0 and mp.backup_next_offset <= mp.backup_first_offset:
        add(
            "manifest",
            f"{mp.count} records but backup range [{mp.backup_first_offset}, "
            f"{mp.backup_next_offset}) is empty",
        )
    digest = checksum((b.key, b.value, b.headers, b.timestamp) for b in backup)
    if digest != mp.checksum:
        add(
            "checksum",
            f"checksum of the backup records {digest} != manifest's {mp.checksum}",
        )
    if mp.mirror is not None and mp.mirror == mp.owner:
        add("mirror", f"owner {mp.owner} is also named as its mirror")

    # consistency: nothing after T_N, late count
    stamps = [(r.offset, r.timestamp) for r in primary]
    stamps += [(b.primary_offset or -1, b.timestamp) for b in unverifiable]
    after = [o for o, ts in stamps if ts > t_end]
    if after:
        add(
            "timestamp",
            f"{len(after)} record(s) stamped after T={t_end}: offsets {_offsets(after)}",
        )
    late = sum(1 for _, ts in stamps if t_before is not None and ts <= t_before)
    if late != mp.late:
        add(
            "late-count",
            f"manifest says {mp.late} late, {late} record(s) are stamped at or before "
            f"T={t_before if t_before is not None else '-'} of the previous set",
        )
    max_ts = max((ts for _, ts in stamps), default=-1)
    if mp.max_timestamp != max_ts:
        add("max-timestamp", f"manifest max_timestamp {mp.max_timestamp}, records' {max_ts}")
    return len(unverifiable)


# --------------------------------------------------------------------------- main


async def verify(
    settings: Settings,
    set_id: int | None = None,
    all_sets: bool = True,
    timeout_s: float = 60,
    progress: ProgressCallback | None = None,
) -> VerifyResult:
    """Verify committed sets: ``set_id`` alone, else all (``all_sets``) or the last one.

    Raises TopicError when there is no sets topic, BrokerUnavailable when a cluster cannot
    be reached; everything found wrong in the data is a Problem in the result.
    """
    result = VerifyResult()
    problems = _Problems(result)

    source_admin = Admin(settings.source.confluent(), timeout_s=min(timeout_s, 15.0))
    backup_admin = Admin(settings.backup_cluster.confluent(), timeout_s=min(timeout_s, 15.0))
    try:
        # Group offsets before manifests: an offset is committed after its manifest is
        # written, so every offset read here has its manifest among those read below.
        group_offsets: dict[Portion, int] | None = None
        if set_id is None:
            group_offsets = await _group_offsets(source_admin, settings)
        manifests = await _read_manifests(settings, problems, timeout_s)
        by_id = _manifest_checks(manifests, problems)
        if not by_id:
            return result
        ids = sorted(by_id)
        if set_id is not None:
            if set_id not in by_id:
                problems.add(
                    set_id,
                    None,
                    "missing-set",
                    f"no manifest (committed sets: {ids[0]}..{ids[-1]})",
                )
                return result
            selected = [set_id]
        elif all_sets:
            selected = ids
        else:
            selected = [ids[-1]]
        result.sets_checked = len(selected)
        result.first_set, result.last_set = selected[0], selected[-1]
        source_topics = await source_admin.partition_counts()
        backup_topics = await backup_admin.partition_counts()
        await _check_portions(
            settings,
            by_id,
            ids,
            selected,
            source_topics,
            backup_topics,
            problems,
            timeout_s,
            progress,
        )
        if group_offsets is not None:
            _check_group_offsets(by_id, ids, group_offsets, problems)
    finally:
        await source_admin.close()
        await backup_admin.close()
    return result


async def _group_offsets(admin: Admin, settings: Settings) -> dict[Portion, int]:
    """All committed offsets of the primary group, for the topics it may back up."""
    counts = await admin.partition_counts()
    portions = [
        (t, p) for t, n in sorted(counts.items()) if not t.startswith("__") for p in range(n)
    ]
    if settings.source.topics:
        wanted = set(settings.source.topics)
        portions = [tp for tp in portions if tp[0] in wanted]
    elif settings.source.topic_regex:
        pattern = re.compile(settings.source.topic_regex)
        portions = [tp for tp in portions if pattern.fullmatch(tp[0])]
    if not portions:
        return {}
    try:
        return await admin.group_offsets(settings.group, portions)
    except KafkaException as exc:
        raise BrokerUnavailable(
            f"cannot read committed offsets of group {settings.group!r}: {exc}"
        ) from exc


def _check_group_offsets(
    by_id: dict[int, Manifest],
    ids: list[int],
    offsets: dict[Portion, int],
    problems: _Problems,
) -> None:
    last = by_id[ids[-1]]
    boundaries: dict[Portion, set[int]] = {}
    for sid in ids:
        for p in by_id[sid].portions:
            b = boundaries.setdefault((p.topic, p.partition), set())
            b.add(p.first_offset)
            b.add(p.next_offset)
    cuts = {(p.topic, p.partition): p.next_offset for p in last.portions}
    for portion, committed in sorted(offsets.items()):
        cut = cuts.get(portion)
        if cut is not None and committed > cut:
            problems.add(
                None,
                portion,
                "offset-ahead",
                f"group committed offset {committed}, beyond the last set's "
                f"(set {last.set_id}) cut {cut}",
            )
        elif portion in boundaries and committed not in boundaries[portion]:
            problems.add(
                None,
                portion,
                "offset-not-boundary",
                f"group committed offset {committed}, which is no set's cut",
            )


async def _check_portions(
    settings: Settings,
    by_id: dict[int, Manifest],
    ids: list[int],
    selected: list[int],
    source_topics: dict[str, int],
    backup_topics: dict[str, int],
    problems: _Problems,
    timeout_s: float,
    progress: ProgressCallback | None,
) -> None:
    result = problems.result
    # per portion, every manifest entry in set order (for context) and which to check
    history: dict[Portion, list[tuple[Manifest, ManifestPortion]]] = {}
    for sid in ids:
        m = by_id[sid]
        for p in m.portions:
            history.setdefault((p.topic, p.partition), []).append((m, p))
    wanted = set(selected)
    total = sum(1 for entries in history.values() for m, _ in entries if m.set_id in wanted)
    done = 0
    async with (
        standalone_consumer(settings.source.aiokafka(), **FETCH) as primary_consumer,
        standalone_consumer(settings.backup_cluster.aiokafka(), **FETCH) as backup_consumer,
    ):
        for portion, entries in sorted(history.items()):
            todo = [(i, m, p) for i, (m, p) in enumerate(entries) if m.set_id in wanted]
            if not todo:
                continue
            topic, partition = portion
            if source_topics.get(topic, 0) <= partition:
                problems.add(
                    todo[0][1].set_id,
                    portion,
                    "missing-topic",
                    f"primary partition {_name(portion)} does not exist on "
                    f"{settings.source.bootstrap_servers}",
                )
                done += len(todo)
                continue
            backup_names = sorted({p.backup_topic for _, _, p in todo})
            absent = [b for b in backup_names if backup_topics.get(b, 0) <= partition]
            if absent:
                problems.add(
                    todo[0][1].set_id,
                    portion,
                    "missing-topic",
                    f"backup partition(s) {', '.join(f'{b}[{partition}]' for b in absent)} "
                    f"do not exist on {settings.backup_cluster.bootstrap_servers}",
                )
                done += len(todo)
                continue
            ptp = TopicPartition(topic, partition)
            earliest = (await primary_consumer.beginning_offsets([ptp]))[ptp]
            first_entry = todo[0][2]
            summary = PortionSummary(
                first_set=todo[0][1].set_id,
                last_set=todo[-1][1].set_id,
                first_offset=first_entry.first_offset,
                next_offset=todo[-1][2].next_offset,
                earliest_offset=earliest,
            )
            result.portions[portion] = summary
            pcur = RangeCursor(primary_consumer, ptp, timeout_s)
            pcur.start()
            bcurs: dict[str, RangeCursor] = {}
            for i, m, mp in todo:
                prev = entries[i - 1] if i > 0 else None
                _prefix_checks(m, mp, prev, earliest, problems)
                primary, p_ok = await pcur.take(mp.first_offset, mp.next_offset)
                backup: list[BackupRecord] = []
                b_ok = True
                if mp.backup_first_offset >= 0 and mp.backup_next_offset > mp.backup_first_offset:
                    bcur = bcurs.get(mp.backup_topic)
                    if bcur is None:
                        bcur = bcurs[mp.backup_topic] = RangeCursor(
                            backup_consumer, TopicPartition(mp.backup_topic, partition), timeout_s
                        )
                    if len(bcurs) > 1 or bcur.base is None:
                        bcur.start()
                        bcur.base = None  # reassigning drops the consumer's position
                    raw, b_ok = await bcur.take(mp.backup_first_offset, mp.backup_next_offset)
                    backup, ignored = set_records(raw, m.set_id, mp.owner)
                    summary.ignored += ignored
                    del raw
                t_before = _previous_end(m, by_id)
                gone = _compare(
                    m.set_id,
                    portion,
                    mp,
                    primary,
                    p_ok,
                    backup,
                    b_ok,
                    m.window_end_ms,
                    t_before,
                    problems,
                    earliest,
                )
                summary.records += len(primary) + gone
                summary.unverifiable += gone
                result.records_checked += len(primary) + gone
                done += 1
                if progress is not None:
                    progress(done, total, f"set {m.set_id} {_name(portion)}")
            # the backup consumer moves on to the next portion
            bcurs.clear()


def _previous_end(m: Manifest, by_id: dict[int, Manifest]) -> int | None:
    """T_{N-1}: records stamped at or before it are late in set N; none before set 0."""
    prev = by_id.get(m.set_id - 1)
    if prev is not None:
        return prev.window_end_ms
    if m.set_id > 0:
        return m.window_start_ms
    return None


def _prefix_checks(
    m: Manifest,
    mp: ManifestPortion,
    prev: tuple[Manifest, ManifestPortion] | None,
    earliest: int,
    problems: _Problems,
) -> None:
    portion = (mp.topic, mp.partition)

    def add(kind: str, text: str) -> None:
        problems.add(m.set_id, portion, kind, text)

    if mp.next_offset < mp.first_offset:
        add(
            "not-prefix",
            f"cut moves backwards: next_offset {mp.next_offset} < first_offset {mp.first_offset}",
        )
    if prev is None:
        # the first set may start anywhere (start_from, retention); the summary names it
        if mp.first_offset == earliest and mp.first_seq != 0:
            add(
                "seq",
                f"first set starts at the partition's earliest offset {earliest} but its "
                f"first_seq is {mp.first_seq}, not 0",
            )
        return
    pm, pp = prev
    if mp.first_offset > pp.next_offset:
        add(
            "gap",
            f"starts at offset {mp.first_offset} but set {pm.set_id} ended at {pp.next_offset}: "
            f"primary offsets [{pp.next_offset}, {mp.first_offset}) are in no set",
        )
    elif mp.first_offset < pp.next_offset:
        add(
            "overlap",
            f"starts at offset {mp.first_offset} but set {pm.set_id} already covers up to "
            f"{pp.next_offset}: offsets [{mp.first_offset}, {pp.next_offset}) are in two sets",
        )
    if mp.first_seq != pp.last_seq + 1:
        add(
            "seq",
            f"first_seq {mp.first_seq} does not follow set {pm.set_id}'s last_seq {pp.last_seq}",
        )
    if (
        mp.backup_topic == pp.backup_topic
        and mp.count > 0
        and pp.count > 0
        and mp.backup_first_offset < pp.backup_next_offset
    ):
        add(
            "backup-overlap",
            f"backup range [{mp.backup_first_offset}, {mp.backup_next_offset}) starts before "
            f"set {pm.set_id}'s range ends ({pp.backup_next_offset})",
        )


# --------------------------------------------------------------------------- output


def render(result: VerifyResult, console: Console) -> None:
    """A table of problems (if any) and the summary line."""
    if result.problems:
        table = Table(title="problems", show_lines=False)
        table.add_column("set", justify="right")
        table.add_column("portion")
        table.add_column("kind", style="bold red")
        table.add_column("problem", overflow="fold")
        for p in result.problems:
            table.add_row(
                "-" if p.set_id is None else str(p.set_id),
                _name(p.portion) if p.portion else "-",
                p.kind,
                p.message,
            )
        console.print(table)
    if result.sets_checked == 0 and result.ok:
        console.print("no committed sets yet: nothing to verify")
    style = "green" if result.ok else "bold red"
    console.print(result.summary(), style=style, highlight=False)


@contextlib.contextmanager
def progress_bar(console: Console, label: str = "verify") -> Iterator[ProgressCallback]:
    """A rich progress bar, as a callback for ``verify(progress=...)`` or ``restore``."""
    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("", total=None)

        def update(done: int, total: int, what: str) -> None:
            bar.update(task, completed=done, total=total, description=what)

        yield update


__all__ = [
    "PortionSummary",
    "Problem",
    "ProgressCallback",
    "VerifyResult",
    "progress_bar",
    "render",
    "verify",
]
