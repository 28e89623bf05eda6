"""What a restore writes where: the set chosen, each portion's sets and target, the result.

Pure functions over manifests, with no I/O, so set selection and planning are testable
without a cluster; ``connector.restore`` carries the plan out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from connector.config import ClusterConfig
from connector.errors import TandemError, UsageError
from connector.messages import Manifest, ManifestPortion, MirroredRecord

Portion = tuple[str, int]


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
    # the group's own committed offset on the target, when it had another: left as it is,
    # since a rerun must not rewind an application that already consumes there
    kept: int | None = None


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
        what = f"set {self.set_id} (T={iso(self.window_end_ms)})"
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


def iso(ms: int) -> str:
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
                f"no set ends at or before {iso(at_ms)}: the first, set {first.set_id}, "
                f"ends at {iso(first.window_end_ms)}"
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


def partition_plans(
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


def checkpoints_at(
    manifests: Mapping[int, Manifest], last: int
) -> dict[tuple[str, Portion], tuple[int, int]]:
    """Per (group, portion), the newest checkpoint at or before set ``last``: (set, offset)."""
    out: dict[tuple[str, Portion], tuple[int, int]] = {}
    for sid in sorted(i for i in manifests if i <= last):
        for c in manifests[sid].checkpoints:
            out[(c.group, (c.topic, c.partition))] = (sid, c.offset)
    return out


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
                f"{o.target_topic}[{o.partition}] {o.target_offset}"
                + (f" (not written: the group is at {o.kept})" if o.kept is not None else ""),
            )
        console.print(offsets)
    for problem in result.problems:
        console.print(f"problem: {problem}", style="bold red", highlight=False, soft_wrap=True)
    if result.unsecured:
        console.print(
            f"includes {result.unsecured:,} UNSECURED record(s) past set {result.set_id}'s cut: "
            "the most data there is, but not a consistent cut",
            style="bold yellow",
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        result.summary(),
        style="green" if result.ok else "bold red",
        highlight=False,
        soft_wrap=True,
    )


__all__ = [
    "PartitionPlan",
    "Portion",
    "RestoreRequest",
    "RestoreResult",
    "TranslatedOffset",
    "checkpoints_at",
    "iso",
    "parse_time",
    "parse_topic_map",
    "partition_plans",
    "render",
    "select_set",
]
