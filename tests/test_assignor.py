"""The tandem assignor: invariants over random groups, stickiness scenarios, aiokafka adapter."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Mapping
from functools import partial

import pytest
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from connector.assignor import Candidate, Portion, TandemAssignor, plan
from connector.messages import HeldPortion, MemberMetadata, PortionMap, decode

Members = dict[str, Candidate]


def held(portions: list[Portion]) -> list[HeldPortion]:
    return [HeldPortion(topic=t, partition=p) for t, p in portions]


def check_invariants(
    members: Mapping[str, Candidate],
    portions: list[Portion],
    coordinator: str,
    max_slots: int,
    pmap: PortionMap,
    assignments: Mapping[str, list[Portion]],
) -> None:
    # Names: the smallest Kafka id keeps a contested name; at most max_slots are admitted.
    first_id: dict[str, str] = {}
    for kid in sorted(members):
        first_id.setdefault(members[kid].metadata.name, kid)
    names = [m.name for m in pmap.members]
    assert len(names) == len(set(names)) == min(max_slots, len(first_id))
    for m in pmap.members:
        assert first_id[m.name] == m.kafka_member_id
    slots = [m.slot for m in pmap.members]
    assert len(set(slots)) == len(slots)
    assert all(0 <= s < max_slots for s in slots)
    assert pmap.epoch == max(c.metadata.epoch for c in members.values()) + 1
    assert pmap.coordinator == members[coordinator].metadata.name

    # Ownership: every ownable portion exactly once, only to subscribers, leaving ones last.
    cand = {m.name: members[m.kafka_member_id] for m in pmap.members}
    subscribers: dict[str, list[str]] = {}
    for t in {t for t, _ in portions}:
        subs = [n for n, c in cand.items() if t in c.topics]
        subscribers[t] = [n for n in subs if not cand[n].metadata.leaving] or subs
    keys = [(p.topic, p.partition) for p in pmap.portions]
    assert len(keys) == len(set(keys))
    assert set(keys) == {p for p in portions if subscribers[p[0]]}
    for p in pmap.portions:
        eligible = subscribers[p.topic]
        assert p.owner in eligible
        assert p.mirror != p.owner
        if len(eligible) == 1:
            assert p.mirror is None
        else:
            assert p.mirror in eligible

    # Kafka assignments are exactly the map's owners.
    assert set(assignments) == set(members)
    by_kid = {m.name: m.kafka_member_id for m in pmap.members}
    expected: dict[str, set[Portion]] = {kid: set() for kid in members}
    for p in pmap.portions:
        expected[by_kid[p.owner]].add((p.topic, p.partition))
    assert {kid: set(ps) for kid, ps in assignments.items()} == expected
    assert all(len(ps) == len(set(ps)) for ps in assignments.values())

    # Balance, when every admitted member reads the same topics.
    if len({c.topics for c in cand.values()}) == 1 and pmap.portions:
        eligible = subscribers[pmap.portions[0].topic]
        owners = Counter({n: 0 for n in eligible}) + Counter(p.owner for p in pmap.portions)
        counts = [owners[n] for n in eligible]
        assert max(counts) - min(counts) <= 1, owners
        if len(eligible) > 1:
            mirrors = Counter(p.mirror for p in pmap.portions)
            counts = [mirrors[n] for n in eligible]
            assert max(counts) - min(counts) <= 1, mirrors


@st.composite
def groups(draw: st.DrawFn) -> tuple[Members, list[Portion], str, int]:
    topics = [f"t{i}" for i in range(draw(st.integers(1, 3)))]
    all_portions = [(t, p) for t in topics for p in range(20)]
    portions = draw(st.lists(st.sampled_from(all_portions), min_size=1, max_size=60, unique=True))
    max_slots = draw(st.integers(1, 12))
    same_topics = draw(st.booleans())
    subset = st.lists(st.sampled_from(portions), max_size=len(portions), unique=True)
    kids = draw(
        st.lists(st.text("abcdef0123", min_size=1, max_size=6), min_size=1, max_size=9, unique=True)
    )
    members: Members = {}
    for kid in kids:
        meta = MemberMetadata(
            name=draw(st.sampled_from([f"w{i}" for i in range(10)])),
            slot=draw(st.integers(-1, max_slots + 1)),
            epoch=draw(st.integers(0, 5)),
            owned=held(draw(subset)),
            mirrored=held(draw(subset)),
            leaving=draw(st.booleans()) and draw(st.booleans()),
        )
        mine = topics if same_topics else draw(st.lists(st.sampled_from(topics), unique=True))
        members[kid] = Candidate(meta, frozenset(mine))
    return members, portions, draw(st.sampled_from(kids)), max_slots


def feed_back(members: Members, pmap: PortionMap) -> Members:
    """What each admitted member would announce after receiving ``pmap``."""
    out = dict(members)
    for m in pmap.members:
        c = members[m.kafka_member_id]
        owned = [(p.topic, p.partition) for p in pmap.portions if p.owner == m.name]
        mirrored = [(p.topic, p.partition) for p in pmap.portions if p.mirror == m.name]
        meta = c.metadata.model_copy(
            update={
                "slot": m.slot,
                "epoch": pmap.epoch,
                "owned": held(owned),
                "mirrored": held(mirrored),
            }
        )
        out[m.kafka_member_id] = Candidate(meta, c.topics)
    return out


def layout(pmap: PortionMap) -> tuple[object, ...]:
    """The map without its epoch and Kafka ids: what a restart must not change."""
    return (
        sorted((m.name, m.slot) for m in pmap.members),
        [(p.topic, p.partition, p.owner, p.mirror) for p in pmap.portions],
    )


@settings(max_examples=300, deadline=None)
@given(groups(), st.randoms(use_true_random=False))
def test_invariants_hold_and_plan_is_deterministic(
    group: tuple[Members, list[Portion], str, int], rnd: random.Random
) -> None:
    members, portions, coordinator, max_slots = group
    pmap, assignments = plan(members, portions, coordinator=coordinator, max_slots=max_slots)
    check_invariants(members, portions, coordinator, max_slots, pmap, assignments)

    kids = list(members)
    rnd.shuffle(kids)
    shuffled_portions = list(portions)
    rnd.shuffle(shuffled_portions)
    again = plan(
        {k: members[k] for k in kids},
        shuffled_portions,
        coordinator=coordinator,
        max_slots=max_slots,
    )
    assert again == (pmap, assignments)
    assert decode(PortionMap, pmap.encode()) == pmap


@settings(max_examples=200, deadline=None)
@given(groups())
def test_a_settled_map_is_a_fixed_point(group: tuple[Members, list[Portion], str, int]) -> None:
    members, portions, coordinator, max_slots = group
    pmap, _ = plan(members, portions, coordinator=coordinator, max_slots=max_slots)
    settled, _ = plan(
        feed_back(members, pmap), portions, coordinator=coordinator, max_slots=max_slots
    )
    assert layout(settled) == layout(pmap)
    assert settled.epoch == pmap.epoch + 1


PORTIONS = [(t, p) for t in ("orders", "payments") for p in range(24)]


def settled_group(names: list[str]) -> Members:
    members = {
        f"id-{n}": Candidate(MemberMetadata(name=n), frozenset({"orders", "payments"}))
        for n in names
    }
    pmap, _ = plan(members, PORTIONS, coordinator=f"id-{names[0]}", max_slots=16)
    return feed_back(members, pmap)


def current(members: Members) -> PortionMap:
    return plan(members, PORTIONS, coordinator=min(members), max_slots=16)[0]


def owners(pmap: PortionMap) -> dict[Portion, str]:
    return {(p.topic, p.partition): p.owner for p in pmap.portions}


def mirrors(pmap: PortionMap) -> dict[Portion, str | None]:
    return {(p.topic, p.partition): p.mirror for p in pmap.portions}


def moved(
    before: Mapping[Portion, str | None], after: Mapping[Portion, str | None]
) -> set[Portion]:
    return {p for p in before if before[p] != after[p]}


NAMES = [f"worker-{i}" for i in range(7)]


def test_a_seventh_worker_takes_few_portions() -> None:
    six = settled_group(NAMES[:6])
    before = current(six)
    seven = dict(six)
    seven["id-worker-6"] = Candidate(
        MemberMetadata(name="worker-6"), frozenset({"orders", "payments"})
    )
    after = current(seven)
    assert len(moved(owners(before), owners(after))) <= math.ceil(48 / 7) + 1
    assert set(moved(owners(before), owners(after))) == {
        p for p, o in owners(after).items() if o == "worker-6"
    }
    assert len(moved(mirrors(before), mirrors(after))) <= math.ceil(48 / 7) + 1
    assert {m.name: m.slot for m in after.members}.items() >= {
        m.name: m.slot for m in before.members
    }.items()


def test_removing_a_worker_fails_its_portions_over_to_their_mirrors() -> None:
    six = settled_group(NAMES[:6])
    before = current(six)
    five = {k: c for k, c in six.items() if c.metadata.name != "worker-3"}
    after = current(five)
    lost = {p for p, o in owners(before).items() if o == "worker-3"}
    assert moved(owners(before), owners(after)) == lost
    counts = Counter(owners(after).values())
    assert max(counts.values()) - min(counts.values()) <= 1
    # Each owner's mirrors are spread out, so here balance lets every portion fail over.
    assert all(owners(after)[p] == mirrors(before)[p] for p in lost)
    # New mirrors only for what the lost worker mirrored and what failed over to its mirror.
    assert len(moved(mirrors(before), mirrors(after))) <= 2 * len(lost)


def test_a_leaving_worker_keeps_its_slot_and_hands_everything_to_its_mirrors() -> None:
    six = settled_group(NAMES[:6])
    before = current(six)
    leaving = dict(six)
    old = six["id-worker-2"]
    leaving["id-worker-2"] = Candidate(
        old.metadata.model_copy(update={"leaving": True}), old.topics
    )
    after = current(leaving)
    assert after.slot_of("worker-2") == before.slot_of("worker-2")
    assert "worker-2" not in {p.owner for p in after.portions} | {p.mirror for p in after.portions}
    lost = {p for p, o in owners(before).items() if o == "worker-2"}
    assert moved(owners(before), owners(after)) == lost


def test_a_lone_leaving_worker_keeps_its_portions() -> None:
    members = {"k": Candidate(MemberMetadata(name="solo", leaving=True), frozenset({"orders"}))}
    pmap, assignments = plan(members, [("orders", 0), ("orders", 1)], coordinator="k", max_slots=4)
    assert [(p.owner, p.mirror) for p in pmap.portions] == [("solo", None), ("solo", None)]
    assert assignments == {"k": [("orders", 0), ("orders", 1)]}


def test_a_restart_with_new_member_ids_changes_nothing() -> None:
    six = settled_group(NAMES[:6])
    before = current(six)
    restarted = {f"new-{c.metadata.name}": c for c in feed_back(six, before).values()}
    after = current(restarted)
    assert layout(after) == layout(before)
    assert after.epoch == before.epoch + 1
    assert {m.kafka_member_id for m in after.members} == set(restarted)


def test_contested_names_and_slots_are_settled_deterministically() -> None:
    topics = frozenset({"orders"})
    members = {
        "b": Candidate(MemberMetadata(name="w", slot=0, epoch=1), topics),
        "a": Candidate(MemberMetadata(name="w", slot=1, epoch=1), topics),
        "c": Candidate(MemberMetadata(name="x", slot=1, epoch=3), topics),
        "d": Candidate(MemberMetadata(name="y", slot=9), topics),
    }
    pmap, assignments = plan(members, [("orders", 0)], coordinator="b", max_slots=2)
    # "a" keeps the name w; x saw a newer map, so it wins slot 1; y does not fit in 2 slots.
    assert [(m.name, m.slot, m.kafka_member_id) for m in pmap.members] == [
        ("w", 0, "a"),
        ("x", 1, "c"),
    ]
    assert pmap.coordinator == "w"
    assert assignments["b"] == assignments["d"] == []


def test_unknown_coordinator_is_rejected() -> None:
    with pytest.raises(ValueError, match="coordinator"):
        plan({}, [], coordinator="nobody", max_slots=1)


class FakeCluster:
    def __init__(self, partitions: dict[str, set[int]]) -> None:
        self._partitions = partitions

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        return self._partitions.get(topic)


def wire(md: ConsumerProtocolMemberMetadata) -> ConsumerProtocolMemberMetadata:
    """What the leader decodes from the JoinGroup response."""
    return ConsumerProtocolMemberMetadata.decode(md.encode())


def test_adapter_assigns_from_encoded_metadata() -> None:
    maps: list[PortionMap] = []
    assignors = {
        name: TandemAssignor(partial(MemberMetadata, name=name), 8, maps.append)
        for name in ("alpha", "beta", "gamma")
    }
    members = {
        "kid-" + name: wire(a.metadata({"orders", "payments"})) for name, a in assignors.items()
    }
    members["kid-alpha"] = wire(assignors["alpha"].metadata({"orders", "payments", "ghost"}))
    members["kid-broken"] = ConsumerProtocolMemberMetadata(0, ["orders"], b"\xff\xfe garbage")
    assert members["kid-alpha"].subscription == ["ghost", "orders", "payments"]

    cluster = FakeCluster({"orders": {0, 1, 2, 3}, "payments": {0, 1, 2}})
    result = assignors["beta"].assign(cluster, members)

    assert set(result) == set(members)
    pmap = decode(PortionMap, result["kid-beta"].user_data)
    assert pmap.coordinator == "beta"
    assert {m.name for m in pmap.members} == {"alpha", "beta", "gamma"}
    assert len(pmap.portions) == 7
    assert result["kid-broken"].assignment == []
    for kid, assignment in result.items():
        sent = ConsumerProtocolMemberAssignment.decode(assignment.encode())
        assert sent.user_data == result["kid-beta"].user_data
        name = kid.removeprefix("kid-")
        expected = sorted((p.topic, p.partition) for p in pmap.portions if p.owner == name)
        assert sorted((tp.topic, tp.partition) for tp in sent.partitions()) == expected
        assert all(ps == sorted(ps) for _, ps in sent.assignment)

    assignors["gamma"].on_assignment(result["kid-gamma"])
    assert maps == [pmap]


def test_adapter_ignores_an_unreadable_map() -> None:
    maps: list[PortionMap] = []
    assignor = TandemAssignor(lambda: MemberMetadata(name="alpha"), 4, maps.append)
    assignor.on_assignment(ConsumerProtocolMemberAssignment(0, [], b"\x01"))
    assert maps == []
    assert assignor.name == "tandem"
