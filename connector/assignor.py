"""The ``tandem`` partition assignor: who owns and who mirrors each portion.

The planning is a pure function over frozen data so it can be tested exhaustively without
a broker; ``TandemAssignor`` only translates between aiokafka's structs and ``plan``.

Owners and mirrors are chosen by the same procedure (``_distribute``): every portion starts
where it was (the previous owner's claim, else the member that mirrored it, which holds the
copies and so is the natural failover target), anything left goes to the least loaded
candidate, and then load is evened out by moving the least sticky portions along shortest
improving paths. Stopping only when no member can hand work, directly or through a chain,
to a member with two fewer portions makes the counts as even as subscriptions permit, while
moving one portion per unit of imbalance, so stickiness is lost only where balance demands.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)

from connector.errors import MalformedMessage, TandemError
from connector.messages import MapMember, MapPortion, MemberMetadata, PortionMap, decode

__all__ = ["Candidate", "Portion", "TandemAssignor", "plan"]

log = logging.getLogger(__name__)

Portion = tuple[str, int]


@dataclass(frozen=True)
class Candidate:
    """One group member as the leader sees it: what it says about itself and what it reads."""

    metadata: MemberMetadata
    topics: frozenset[str]


def plan(
    members: Mapping[str, Candidate],
    portions: Iterable[Portion],
    *,
    coordinator: str,
    max_slots: int,
) -> tuple[PortionMap, dict[str, list[Portion]]]:
    """Build the portion map and each Kafka member id's owned portions.

    ``members`` is keyed by Kafka member id, which changes on every restart; the map is keyed
    by ``metadata.name`` so that a restarted worker finds its slot and portions again.
    Portions of topics no admitted member subscribes cannot be owned and are left out.
    """
    if coordinator not in members:
        raise ValueError(f"coordinator {coordinator!r} is not a member of the group")
    if max_slots < 1:
        raise ValueError(f"max_slots must be at least 1, got {max_slots}")
    active = _admit(members, max_slots)
    meta = {name: members[kid].metadata for name, kid in active.items()}
    epochs = {name: m.epoch for name, m in meta.items()}
    slots = _slots(meta, max_slots)

    eligible: dict[str, list[str]] = {}
    for topic in sorted({t for kid in active.values() for t in members[kid].topics}):
        subscribers = sorted(n for n, kid in active.items() if topic in members[kid].topics)
        staying = [n for n in subscribers if not meta[n].leaving]
        # Leaving members own only when nobody else can: a leaving owner beats no owner.
        eligible[topic] = staying or subscribers
    items = sorted({(t, p) for t, p in portions if t in eligible})
    owned_by = _held(meta, "owned")
    mirrored_by = _held(meta, "mirrored")

    owner_cands = {p: eligible[p[0]] for p in items}
    owners = _distribute(
        owner_cands,
        claimed=_winners(owner_cands, owned_by, epochs),
        preferred=_winners(owner_cands, mirrored_by, epochs),
    )
    mirror_cands = {p: [m for m in eligible[p[0]] if m != owners[p]] for p in items}
    mirror_cands = {p: c for p, c in mirror_cands.items() if c}
    # Spreading each owner's mirrors over many members spreads a dead owner's load too.
    mirrors = _distribute(
        mirror_cands,
        claimed=_winners(mirror_cands, mirrored_by, epochs),
        preferred={},
        spread=owners,
    )

    portion_map = PortionMap(
        epoch=max(c.metadata.epoch for c in members.values()) + 1,
        first_window=_first_window(members.values()),
        coordinator=members[coordinator].metadata.name,
        members=[
            MapMember(name=n, slot=slots[n], kafka_member_id=active[n])
            for n in sorted(active, key=slots.__getitem__)
        ],
        portions=[
            MapPortion(topic=t, partition=p, owner=owners[(t, p)], mirror=mirrors.get((t, p)))
            for t, p in items
        ],
    )
    assignments: dict[str, list[Portion]] = {kid: [] for kid in members}
    for p in items:
        assignments[active[owners[p]]].append(p)
    return portion_map, assignments


def _first_window(members: Iterable[Candidate]) -> int:
    """Set 0's window is fixed once: members that held a map carry it; newcomers propose.

    The value of the members that saw the newest map wins; among mere proposals, the
    earliest, so no member's proposal lies in the past of another's first set.
    """
    known = [
        (c.metadata.epoch, c.metadata.first_window) for c in members if c.metadata.first_window >= 0
    ]
    if not known:
        return -1
    newest = max(e for e, _ in known)
    return min(w for e, w in known if e == newest)


def _admit(members: Mapping[str, Candidate], max_slots: int) -> dict[str, str]:
    """Map each admitted name to its Kafka member id.

    Members that keep their slot are admitted first, so that a newcomer beyond
    ``max_slots`` never displaces a running worker.
    """
    by_name: dict[str, str] = {}
    for kid in sorted(members):
        by_name.setdefault(members[kid].metadata.name, kid)
    keepers = _kept_slots({n: members[kid].metadata for n, kid in by_name.items()}, max_slots)
    admitted = sorted(by_name, key=lambda n: (n not in keepers, n))[:max_slots]
    return {name: by_name[name] for name in sorted(admitted)}


def _kept_slots(meta: Mapping[str, MemberMetadata], max_slots: int) -> dict[str, int]:
    """Members that keep their previous slot, since transactional ids are bound to it."""
    wanted: dict[int, list[str]] = defaultdict(list)
    for name, m in meta.items():
        if 0 <= m.slot < max_slots:
            wanted[m.slot].append(name)
    epochs = {name: m.epoch for name, m in meta.items()}
    return {_winner(names, epochs): slot for slot, names in wanted.items()}


def _slots(meta: Mapping[str, MemberMetadata], max_slots: int) -> dict[str, int]:
    slots = _kept_slots(meta, max_slots)
    free = iter(sorted(set(range(max_slots)) - set(slots.values())))
    for name in sorted(meta):
        if name not in slots:
            slots[name] = next(free)
    return slots


def _held(meta: Mapping[str, MemberMetadata], field: str) -> dict[Portion, list[str]]:
    claims: dict[Portion, list[str]] = defaultdict(list)
    for name, m in meta.items():
        for h in getattr(m, field):
            claims[(h.topic, h.partition)].append(name)
    return claims


def _winner(names: Iterable[str], epochs: Mapping[str, int]) -> str:
    """Settle a contested claim: the member that saw the newest map knows best."""
    return min(names, key=lambda n: (-epochs[n], n))


def _winners(
    candidates: Mapping[Portion, list[str]],
    claims: Mapping[Portion, list[str]],
    epochs: Mapping[str, int],
) -> dict[Portion, str]:
    won: dict[Portion, str] = {}
    for p, cands in candidates.items():
        valid = [n for n in claims.get(p, ()) if n in cands]
        if valid:
            won[p] = _winner(valid, epochs)
    return won


def _distribute(
    candidates: Mapping[Portion, list[str]],
    *,
    claimed: Mapping[Portion, str],
    preferred: Mapping[Portion, str],
    spread: Mapping[Portion, str] | None = None,
) -> dict[Portion, str]:
    """Give each portion one of its candidates: sticky first, then as even as possible.

    Among equally loaded candidates, a new portion goes to the one holding the fewest
    portions of the same ``spread`` group.
    """
    load = {m: 0 for cands in candidates.values() for m in cands}
    held: dict[str, set[Portion]] = {m: set() for m in load}
    assigned: dict[Portion, str] = {}
    together: Counter[tuple[str, str]] = Counter()

    def put(p: Portion, m: str) -> None:
        assigned[p] = m
        held[m].add(p)
        load[m] += 1
        if spread:
            together[(spread[p], m)] += 1

    def drop(p: Portion, m: str) -> None:
        held[m].remove(p)
        load[m] -= 1
        if spread:
            together[(spread[p], m)] -= 1

    def fresh(p: Portion) -> str:
        group = spread[p] if spread else ""
        return min(candidates[p], key=lambda m: (load[m], together[(group, m)], m))

    items = sorted(candidates)
    for source in (claimed, preferred):
        for p in items:
            if p not in assigned and p in source:
                put(p, source[p])
    for p in items:
        if p not in assigned:
            put(p, fresh(p))

    def stickiness(p: Portion, m: str) -> tuple[int, Portion]:
        return (2 if claimed.get(p) == m else 1 if preferred.get(p) == m else 0), p

    while path := _improving_path(candidates, held, load, stickiness):
        for p, src, dst in path:
            drop(p, src)
            put(p, dst)
    return assigned


def _improving_path(
    candidates: Mapping[Portion, list[str]],
    held: Mapping[str, set[Portion]],
    load: Mapping[str, int],
    stickiness: Callable[[Portion, str], tuple[int, Portion]],
) -> list[tuple[Portion, str, str]]:
    """Find moves that take one portion off a member and give one to a member two lighter.

    Breadth-first, so the path is as short as possible (usually a single move), and each
    hop moves the least sticky portion that can make it.
    """
    lightest = min(load.values(), default=0)
    for src in sorted(load, key=lambda m: (-load[m], m)):
        if load[src] < lightest + 2:
            return []
        parent: dict[str, tuple[Portion, str]] = {}
        queue = deque([src])
        while queue and len(parent) + 1 < len(load):
            x = queue.popleft()
            for p in sorted(held[x], key=lambda q: stickiness(q, x)):
                for z in candidates[p]:
                    if z != src and z not in parent:
                        parent[z] = (p, x)
                        queue.append(z)
        targets = [z for z in parent if load[z] <= load[src] - 2]
        if targets:
            node = min(targets, key=lambda z: (load[z], z))
            path: list[tuple[Portion, str, str]] = []
            while node != src:
                p, prev = parent[node]
                path.append((p, prev, node))
                node = prev
            return path
    return []


class TandemAssignor(AbstractPartitionAssignor):
    """aiokafka adapter around ``plan``; pass an instance in ``partition_assignment_strategy``.

    aiokafka declares the hooks as classmethods, but only ever calls them on the object it
    was given, so instance methods work and let the assignor see this worker's own state.
    """

    name = "tandem"
    version = 0

    def __init__(
        self,
        metadata: Callable[[], MemberMetadata],
        max_slots: int,
        on_map: Callable[[PortionMap], None],
    ) -> None:
        self._current = metadata
        self._max_slots = max_slots
        self._on_map = on_map

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        return ConsumerProtocolMemberMetadata(
            self.version, sorted(topics), self._current().encode()
        )

    def assign(
        self,
        cluster: ClusterMetadata,
        members: Mapping[str, ConsumerProtocolMemberMetadata],
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        candidates: dict[str, Candidate] = {}
        for kid, member in members.items():
            try:
                meta = decode(MemberMetadata, member.user_data)
            except MalformedMessage as exc:
                log.warning("Leaving group member %s out of the map: %s", kid, exc)
                continue
            candidates[kid] = Candidate(meta, frozenset(member.subscription))
        if not candidates:
            raise TandemError("no group member sent readable tandem metadata")

        portions: list[Portion] = []
        for topic in sorted({t for c in candidates.values() for t in c.topics}):
            partitions = cluster.partitions_for_topic(topic)
            if partitions is None:
                log.warning("No partition metadata for topic %s", topic)
                continue
            portions.extend((topic, p) for p in partitions)

        # aiokafka does not tell the leader its own member id; our name is unique and stable.
        own = self._current().name
        mine = sorted(kid for kid, c in candidates.items() if c.metadata.name == own)
        if not mine:
            log.warning("Own name %s not among group members; electing the lowest id", own)
        leader = mine[0] if mine else min(candidates)

        portion_map, owned = plan(
            candidates, portions, coordinator=leader, max_slots=self._max_slots
        )
        data = portion_map.encode()
        result: dict[str, ConsumerProtocolMemberAssignment] = {}
        for kid in members:
            by_topic: dict[str, list[int]] = defaultdict(list)
            for topic, partition in owned.get(kid, []):
                by_topic[topic].append(partition)
            layout = [(t, sorted(ps)) for t, ps in sorted(by_topic.items())]
            result[kid] = ConsumerProtocolMemberAssignment(self.version, layout, data)
        return result

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        try:
            portion_map = decode(PortionMap, assignment.user_data)
        except MalformedMessage:
            # Raising here would break aiokafka's join loop; the worker keeps its old map.
            log.exception("Cannot read the portion map sent by the group leader")
            return
        self._on_map(portion_map)
