"""Protocol steps 1 and 2, checked from outside: the map, numbering and mirroring."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from confluent_kafka import Producer

from connector.control import ControlView
from connector.fleet import WorkerProcess
from connector.messages import MirrorEnvelope, decode, header
from tests.support import control, produce, read_all, wait_for, worker_config

pytestmark = pytest.mark.slow


def all_mirrored(view: ControlView, counts: Counter[tuple[str, int]]) -> bool:
    m = view.latest_map
    if m is None:
        return False
    for p in m.portions:
        a = view.announcements.get(p.owner)
        owned = {(o.topic, o.partition): o for o in a.owned} if a and a.epoch == m.epoch else {}
        o = owned.get((p.topic, p.partition))
        want = counts[(p.topic, p.partition)]
        if o is None or o.next_seq != want:
            return False
        if want and max((r.last_seq for r in o.mirrored_ranges), default=-1) != want - 1:
            return False
    return True


def test_three_workers_number_and_mirror_every_update(
    bootstrap: str, unique: str, make_topics, tmp_path: Path
) -> None:
    group = f"g-{unique}"
    topics = {f"a-{unique}": 6, f"b-{unique}": 6}
    make_topics(bootstrap, topics)
    config = worker_config(tmp_path, bootstrap, group, list(topics))
    fleet = [WorkerProcess(f"w{i}", config, tmp_path).start() for i in range(3)]
    try:
        counts: Counter[tuple[str, int]] = Counter()
        for t in topics:  # several producers while the group forms
            counts += produce(bootstrap, t, 5000)
        assert sum(counts.values()) == 10_000
        # Garbage on every slot's partition of the mirror topic: a worker must shrug it off.
        wait_for(lambda: control(bootstrap, group).latest_map is not None, 60, "a map", fleet)
        p = Producer({"bootstrap.servers": bootstrap})
        for slot in range(8):
            p.produce(f"{group}.mirror", b"\x00garbage", key=b"x:1", partition=slot)
        p.flush(10)

        wait_for(lambda: all_mirrored(control(bootstrap, group), counts), 120, "mirroring", fleet)
        view = control(bootstrap, group)
        assert all(w.alive for w in fleet)
    finally:
        for w in fleet:
            w.terminate()

    m = view.latest_map
    assert m is not None
    names = {w.name for w in fleet}
    assert {mm.name for mm in m.members} == names
    # Every worker holds the identical map.
    assert {a.map_digest for a in view.announcements.values() if a.epoch == m.epoch} == {m.digest()}
    for portion in m.portions:
        assert portion.mirror is not None and portion.mirror != portion.owner
    # The malformed records were counted, not fatal.
    assert sum(a.malformed for a in view.announcements.values()) >= 1

    # Independent read of primary and mirror topic.
    primary = {t: asyncio.run(read_all(bootstrap, t, n)) for t, n in topics.items()}
    mirror = asyncio.run(read_all(bootstrap, f"{group}.mirror", 8))
    seen: dict[tuple[str, int], dict[int, tuple[int, bytes | None, bytes | None]]] = defaultdict(
        dict
    )
    malformed = 0
    for records in mirror.values():
        for r in records:
            try:
                env = decode(MirrorEnvelope, r.value, header(list(r.headers), "tandem.schema"))
            except Exception:
                malformed += 1
                continue
            if env.handoff:
                continue  # a takeover's marker or a surviving mirror passing copies on
            assert env.mirror != env.owner, "a copy was sent to its own owner"
            for rec in env.records:
                got = (rec.offset, rec.key, rec.value)
                prev = seen[(env.topic, env.partition)].setdefault(rec.seq, got)
                assert prev == got, f"seq {rec.seq} of {env.topic}[{env.partition}] reused"
    assert malformed == 8
    for t, parts in primary.items():
        for partition, records in parts.items():
            copies = seen[(t, partition)]
            assert sorted(copies) == list(range(len(records))), f"{t}[{partition}] seq gaps"
            for seq, r in enumerate(records):
                assert copies[seq] == (r.offset, r.key, r.value), f"{t}[{partition}] seq {seq}"
    # What the owners say they had mirrored matches the topic.
    for a in view.announcements.values():
        for o in a.owned:
            for held in o.mirrored_ranges:
                assert held.mirror != a.member
                for seq in range(held.first_seq, held.last_seq + 1):
                    assert seq in seen[(o.topic, o.partition)]
