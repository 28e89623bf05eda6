"""Membership events seen from outside the workers: who numbered what, and when.

The demo, the membership and chaos tests and the benchmarks measure failover, join pauses
and redundancy from the topics alone. Every mirror envelope carries the owner that sent it,
its sequence range and the time the owner sent it (the record's timestamp, a moment after
it read the records); every map and announcement on the control topic carries its time. So
"the dead worker's portions move again" is the first envelope after the kill with a
sequence number the dead worker never sent, and no worker's own counter is trusted.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from aiokafka import TopicPartition

from connector.errors import MalformedMessage
from connector.messages import (
    SCHEMA_HEADER,
    MemberAnnouncement,
    MirrorEnvelope,
    PortionMap,
    decode,
    decode_control,
    header,
)
from connector.reader import read_until_end, standalone_consumer
from connector.status import unprotected

Portion = tuple[str, int]


@dataclass(frozen=True)
class Sent:
    """One mirror envelope: a run of updates an owner numbered (or re-sent) at ``at_ms``."""

    at_ms: int
    owner: str
    mirror: str
    first_seq: int
    last_seq: int


@dataclass
class Timeline:
    sent: dict[Portion, list[Sent]] = field(default_factory=lambda: defaultdict(list))
    maps: list[tuple[int, PortionMap]] = field(default_factory=list)  # (published at, map)
    announcements: list[MemberAnnouncement] = field(default_factory=list)
    records: dict[Portion, dict[int, tuple[int, bytes | None, bytes | None]]] = field(
        default_factory=lambda: defaultdict(dict)
    )
    reused: list[str] = field(default_factory=list)  # a sequence number given to two records
    handoffs: list[tuple[int, Portion, str, int]] = field(default_factory=list)  # at, p, to, seq

    def add(self, at_ms: int, env: MirrorEnvelope) -> None:
        portion = (env.topic, env.partition)
        if not env.handoff:
            self.sent[portion].append(
                Sent(at_ms, env.owner, env.mirror, env.first_seq, env.last_seq)
            )
        elif not env.records and env.partition >= 0:
            self.handoffs.append((at_ms, portion, env.mirror, env.last_seq))
        seen = self.records[portion]
        for r in env.records:
            got = (r.offset, r.key, r.value)
            if seen.setdefault(r.seq, got) != got:
                self.reused.append(
                    f"{portion[0]}[{portion[1]}] seq {r.seq}: offsets {seen[r.seq][0]} and "
                    f"{r.offset}"
                )

    def map_at(self, t_ms: int) -> PortionMap | None:
        """The map in force at t_ms (the newest published before it)."""
        before = [m for at, m in self.maps if at <= t_ms]
        return before[-1] if before else None

    def first_map_after(self, t_ms: int, members: set[str] | None = None) -> tuple[int, PortionMap]:
        """The first map published after t_ms, optionally the first with exactly ``members``."""
        for at, m in self.maps:
            if at > t_ms and (members is None or {mm.name for mm in m.members} == members):
                return at, m
        raise LookupError(f"no map published after {t_ms} with members {members}")

    def owners_of_seqs(self, portion: Portion) -> dict[int, set[str]]:
        """Which owners sent each sequence number of a portion (handoffs left out)."""
        out: dict[int, set[str]] = defaultdict(set)
        for s in self.sent[portion]:
            for seq in range(s.first_seq, s.last_seq + 1):
                out[seq].add(s.owner)
        return out

    def resumed(self, portion: Portion, after_ms: int) -> Sent | None:
        """The first envelope after ``after_ms`` with a sequence number not sent before it.

        That is the moment the portion moved again: its owner read and numbered an update
        nobody had numbered before.
        """
        before = [s.last_seq for s in self.sent[portion] if s.at_ms <= after_ms]
        highest = max(before, default=-1)
        for s in sorted(self.sent[portion], key=lambda s: s.at_ms):
            if s.at_ms > after_ms and s.last_seq > highest:
                return s
        return None

    def gaps(self, portion: Portion, start_ms: int, end_ms: int) -> float:
        """The longest stretch within [start, end] in which the portion numbered nothing new."""
        times = [start_ms]
        highest = -1
        for s in sorted(self.sent[portion], key=lambda s: s.at_ms):
            if s.last_seq > highest:
                highest = s.last_seq
                if start_ms <= s.at_ms <= end_ms:
                    times.append(s.at_ms)
        times.append(end_ms)
        return max(b - a for a, b in pairwise(times)) / 1000

    def protected_at(self, since_ms: int) -> int | None:
        """When, after since_ms, every live owner last said all its portions had two holders."""
        latest: dict[str, MemberAnnouncement] = {}
        for a in sorted(self.announcements, key=lambda a: a.at_ms):
            latest[a.member] = a
            if a.at_ms <= since_ms:
                continue
            m = self.map_at(a.at_ms)
            if m is None:
                continue
            owners = {p.owner for p in m.portions}
            current = [latest.get(o) for o in owners]
            if all(
                c is not None
                and c.epoch == m.epoch
                and c.at_ms > since_ms
                and not any(unprotected(o) for o in c.owned)
                for c in current
            ):
                return a.at_ms
        return None


async def read_timeline(client: dict[str, Any], group: str, mirror_partitions: int) -> Timeline:
    t = Timeline()
    async with standalone_consumer(client) as consumer:
        tps = [TopicPartition(f"{group}.mirror", i) for i in range(mirror_partitions)]
        tps.append(TopicPartition(f"{group}.control", 0))
        async for tp, records in read_until_end(consumer, tps, timeout_s=120):
            for r in records:
                headers = list(r.headers)
                try:
                    if tp.topic.endswith(".mirror"):
                        env = decode(MirrorEnvelope, r.value, header(headers, SCHEMA_HEADER))
                        t.add(r.timestamp, env)
                        continue
                    msg = decode_control(r.value, headers)
                except MalformedMessage:
                    continue
                if isinstance(msg, PortionMap):
                    t.maps.append((r.timestamp, msg))
                elif isinstance(msg, MemberAnnouncement):
                    t.announcements.append(msg)
    for portion in t.sent:
        t.sent[portion].sort(key=lambda s: s.at_ms)
    t.maps.sort(key=lambda am: am[0])
    return t
