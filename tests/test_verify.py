"""``verify`` against synthetic sets written straight to the broker, correct and tampered.

No workers run here: each test builds a primary topic, a backup topic and manifests by hand
(``Scenario``), changes one thing, and checks that verify names exactly that problem.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from confluent_kafka import Producer
from rich.console import Console

from connector.config import Settings, load_settings
from connector.errors import TopicError
from connector.messages import Manifest, ManifestPortion
from connector.sets import checksum
from connector.verify import Problem, VerifyResult, render, verify

BASE = 1_700_000_000_000  # T_0 = BASE + 1000, T_1 = BASE + 2000, T_2 = BASE + 3000
INTERVAL = 1000
OWNER = "w-1"
MIRROR = "w-2"

Headers = list[tuple[str, bytes | None]]


@dataclass
class Rec:
    """A primary record as produced, with the offset the broker gave it."""

    key: bytes | None
    value: bytes | None
    headers: Headers
    ts: int
    offset: int = -1


@dataclass
class BackupRec:
    key: bytes | None
    value: bytes | None
    headers: Headers
    ts: int


# Per partition: (key, value, headers, ms after BASE). Partition 0 has a late record
# (stamped 900 after one stamped 1500: it falls in set 1 and counts as late there).
PRIMARY: dict[int, list[tuple[bytes | None, bytes | None, Headers, int]]] = {
    0: [
        (b"a", b"v0", [("h", b"1"), ("h", b"2"), ("n", None)], 100),
        (b"b", None, [], 200),  # a tombstone
        (None, b"keyless", [("x", b"")], 900),
        (b"c", b"v3", [("h", b"3")], 1500),
        (b"d", b"late", [], 900),
        (b"e", b"v5", [], 1800),
        (b"f", b"v6", [("t", b"z")], 2500),
        (b"g", b"v7", [], 2999),
    ],
    1: [
        (b"p", b"w0", [("k", b"1")], 500),
        (b"q", b"w1", [], 1000),  # exactly T_0: still set 0
        (b"r", b"w2", [("dup", b"1"), ("dup", b"1")], 2600),
        (b"s", b"", [], 2700),
    ],
}
SETS = 3


def t_end(set_id: int) -> int:
    return BASE + (set_id + 1) * INTERVAL


def backup_headers(r: Rec, set_id: int, seq: int, owner: str = OWNER) -> Headers:
    return [
        *r.headers,
        ("tandem.set", str(set_id).encode()),
        ("tandem.seq", str(seq).encode()),
        ("tandem.offset", str(r.offset).encode()),
        ("tandem.owner", owner.encode()),
    ]


@dataclass
class Scenario:
    """Primary data on the broker, cut into sets; backup and manifests written on demand."""

    bootstrap: str
    topic: str
    group: str
    partitions: int
    primary: dict[int, list[Rec]] = field(default_factory=dict)
    # sets[n][partition] = the primary records of set n in that partition
    sets: list[dict[int, list[Rec]]] = field(default_factory=list)
    backup_offsets: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)

    @property
    def backup_topic(self) -> str:
        return f"{self.group}-backup.{self.topic}"

    @property
    def sets_topic(self) -> str:
        return f"{self.group}.sets"

    def settings(self) -> Settings:
        return load_settings(
            None,
            group=self.group,
            source={"bootstrap_servers": self.bootstrap, "topics": [self.topic]},
            backup={"topic_prefix": f"{self.group}-backup."},
        )

    def _producer(self) -> Producer:
        return Producer({"bootstrap.servers": self.bootstrap, "acks": "all", "linger.ms": 0})

    def _write(self, topic: str, items: list[tuple[int, BackupRec | Rec]]) -> list[int]:
        """Produce in order (one partition at a time, flushed), return the offsets."""
        offsets: list[int] = [-1] * len(items)
        p = self._producer()
        for i, (partition, r) in enumerate(items):

            def done(err: Any, msg: Any, i: int = i) -> None:
                assert err is None, err
                offsets[i] = msg.offset()

            ts = r.ts
            p.produce(
                topic,
                key=r.key,
                value=r.value,
                partition=partition,
                headers=list(r.headers) or None,
                timestamp=ts,
                on_delivery=done,
            )
            p.flush(10)
        assert p.flush(10) == 0
        return offsets

    def produce_primary(self) -> None:
        for partition, rows in PRIMARY.items():
            recs = [Rec(k, v, list(h), BASE + dt) for k, v, h, dt in rows]
            offs = self._write(self.topic, [(partition, r) for r in recs])
            for r, o in zip(recs, offs, strict=True):
                r.offset = o
            self.primary[partition] = recs

    def cut(self, move: dict[tuple[int, int], int] | None = None) -> None:
        """Cut each partition by timestamp like an owner; ``move[(set, partition)] = k``
        moves the cut at the end of that set k records later (a wrong cut, for tests)."""
        self.sets = [{p: [] for p in self.primary} for _ in range(SETS)]
        for partition, recs in self.primary.items():
            open_set = 0
            for r in recs:
                while open_set < SETS - 1 and r.ts > t_end(open_set):
                    open_set += 1
                self.sets[open_set][partition].append(r)
        for (set_id, partition), k in (move or {}).items():
            nxt = self.sets[set_id + 1][partition]
            self.sets[set_id][partition].extend(nxt[:k])
            del nxt[:k]

    def backup_plan(self) -> dict[tuple[int, int], list[BackupRec]]:
        """The correct backup records per (set, partition), for a test to tamper with."""
        plan: dict[tuple[int, int], list[BackupRec]] = {}
        for partition in self.primary:
            seq = 0
            for set_id in range(SETS):
                rows = []
                for r in self.sets[set_id][partition]:
                    hs = backup_headers(r, set_id, seq)
                    rows.append(BackupRec(r.key, r.value, hs, r.ts))
                    seq += 1
                plan[(set_id, partition)] = rows
        return plan

    def write_backup(self, plan: dict[tuple[int, int], list[BackupRec]]) -> None:
        for set_id in range(SETS):
            for partition in self.primary:
                rows = plan[(set_id, partition)]
                if not rows:
                    self.backup_offsets[(set_id, partition)] = (-1, -1)
                    continue
                offs = self._write(self.backup_topic, [(partition, r) for r in rows])
                self.backup_offsets[(set_id, partition)] = (offs[0], offs[-1] + 1)

    def manifests(self) -> list[Manifest]:
        """Correct manifests for the cut and the backup ranges written."""
        out = []
        next_offset = {p: recs[0].offset for p, recs in self.primary.items()}
        seq = dict.fromkeys(self.primary, 0)
        for set_id in range(SETS):
            portions = []
            for partition in sorted(self.primary):
                recs = self.sets[set_id][partition]
                first = next_offset[partition]
                nxt = recs[-1].offset + 1 if recs else first
                late = sum(1 for r in recs if set_id > 0 and r.ts <= t_end(set_id - 1))
                bfirst, bnext = self.backup_offsets[(set_id, partition)]
                portions.append(
                    ManifestPortion(
                        topic=self.topic,
                        partition=partition,
                        first_offset=first,
                        next_offset=nxt,
                        first_seq=seq[partition],
                        last_seq=seq[partition] + len(recs) - 1,
                        count=len(recs),
                        backup_topic=self.backup_topic,
                        backup_first_offset=bfirst,
                        backup_next_offset=bnext,
                        checksum=checksum((r.key, r.value, r.headers, r.ts) for r in recs),
                        late=late,
                        max_timestamp=max((r.ts for r in recs), default=-1),
                        owner=OWNER,
                        mirror=MIRROR,
                    )
                )
                next_offset[partition] = nxt
                seq[partition] += len(recs)
            out.append(
                Manifest(
                    set_id=set_id,
                    group=self.group,
                    window_start_ms=t_end(set_id - 1) if set_id else 0,
                    window_end_ms=t_end(set_id),
                    committed_ms=t_end(set_id) + 1500,
                    epoch=1,
                    coordinator=OWNER,
                    members=[OWNER, MIRROR],
                    late=sum(p.late for p in portions),
                    portions=portions,
                )
            )
        return out

    def write_manifests(self, manifests: list[Manifest]) -> None:
        p = self._producer()
        for m in manifests:
            p.produce(
                self.sets_topic,
                key=str(m.set_id).encode(),
                value=m.encode(),
                headers=m.headers(),
                partition=0,
            )
        assert p.flush(10) == 0

    def build(
        self,
        tamper: Callable[[dict[tuple[int, int], list[BackupRec]]], None] | None = None,
        edit: Callable[[list[Manifest]], list[Manifest]] | None = None,
    ) -> list[Manifest]:
        plan = self.backup_plan()
        if tamper:
            tamper(plan)
        self.write_backup(plan)
        manifests = self.manifests()
        if edit:
            manifests = edit(manifests)
        self.write_manifests(manifests)
        return manifests

    async def verify(self, **kw: Any) -> VerifyResult:
        return await verify(self.settings(), timeout_s=10, **kw)


@pytest.fixture
def scenario(bootstrap: str, unique: str, make_topics: Callable[..., None]) -> Scenario:
    s = Scenario(bootstrap, f"orders-{unique}", f"vg-{unique}", 2)
    make_topics(bootstrap, {s.topic: 2, s.backup_topic: 2, s.sets_topic: 1})
    s.produce_primary()
    s.cut()
    return s


def only(result: VerifyResult, kind: str) -> list[Problem]:
    found = [p for p in result.problems if p.kind == kind]
    assert found, f"no {kind!r} problem in {[p.message for p in result.problems]}"
    return found


def named(problem: Problem, set_id: int, topic: str, partition: int) -> None:
    assert problem.set_id == set_id
    assert problem.portion == (topic, partition)
    assert f"set {set_id}" in problem.message
    assert f"{topic}[{partition}]" in problem.message


def portion_manifest(m: Manifest, partition: int, **update: Any) -> Manifest:
    portions = [p.model_copy(update=update) if p.partition == partition else p for p in m.portions]
    return m.model_copy(update={"portions": portions, "late": sum(p.late for p in portions)})


# --------------------------------------------------------------------------- correct data


async def test_correct_sets_verify_ok(scenario: Scenario) -> None:
    scenario.build()
    result = await scenario.verify()
    assert result.ok, [p.message for p in result.problems]
    assert result.sets_checked == 3
    assert result.records_checked == sum(len(v) for v in PRIMARY.values())
    assert (result.first_set, result.last_set) == (0, 2)
    assert result.portions[(scenario.topic, 0)].first_offset == 0
    assert result.portions[(scenario.topic, 0)].records == 8
    data = json.loads(json.dumps(result.to_json()))
    assert data["ok"] is True and data["sets_checked"] == 3

    out = io.StringIO()
    render(result, Console(file=out, width=200))
    assert "verified 3 sets, 12 records: OK" in out.getvalue()


async def test_single_set_and_last_set(scenario: Scenario) -> None:
    scenario.build()
    one = await scenario.verify(set_id=1)
    assert one.ok and one.sets_checked == 1
    assert one.records_checked == len(scenario.sets[1][0]) + len(scenario.sets[1][1])
    last = await scenario.verify(all_sets=False)
    assert last.ok and (last.first_set, last.last_set) == (2, 2)
    absent = await scenario.verify(set_id=7)
    assert [p.kind for p in absent.problems] == ["missing-set"]


async def test_progress_is_reported(scenario: Scenario) -> None:
    scenario.build()
    seen: list[tuple[int, int]] = []
    result = await scenario.verify(progress=lambda done, total, _what: seen.append((done, total)))
    assert result.ok
    assert seen[-1] == (6, 6)


async def test_zombie_leftovers_in_range_are_ignored(scenario: Scenario) -> None:
    def tamper(plan: dict[tuple[int, int], list[BackupRec]]) -> None:
        rows = plan[(1, 0)]
        r = scenario.sets[1][0][0]
        zombie = BackupRec(r.key, b"zombie copy", backup_headers(r, 1, 3, owner="w-dead"), r.ts)
        other_set = BackupRec(r.key, r.value, backup_headers(r, 0, 3), r.ts)
        rows.insert(1, zombie)
        rows.insert(2, other_set)

    scenario.build(tamper)
    result = await scenario.verify()
    assert result.ok, [p.message for p in result.problems]
    assert result.portions[(scenario.topic, 0)].ignored == 2


async def test_no_sets_topic_is_a_clear_error(bootstrap: str, unique: str) -> None:
    settings = load_settings(
        None,
        group=f"none-{unique}",
        source={"bootstrap_servers": bootstrap, "topics": [f"x-{unique}"]},
    )
    with pytest.raises(TopicError, match=f"none-{unique}.sets does not exist"):
        await verify(settings, timeout_s=10)


# --------------------------------------------------------------------------- tampering


async def test_record_removed(scenario: Scenario) -> None:
    scenario.build(lambda plan: plan[(0, 0)].pop(1))
    result = await scenario.verify()
    assert not result.ok
    (p,) = only(result, "missing")
    named(p, 0, scenario.topic, 0)
    assert "offsets 1" in p.message


async def test_record_duplicated(scenario: Scenario) -> None:
    scenario.build(lambda plan: plan[(1, 0)].insert(2, plan[(1, 0)][1]))
    result = await scenario.verify()
    (p,) = only(result, "duplicate")
    named(p, 1, scenario.topic, 0)
    assert "offsets 4" in p.message
    only(result, "checksum")


async def test_records_swapped(scenario: Scenario) -> None:
    def swap(plan: dict[tuple[int, int], list[BackupRec]]) -> None:
        rows = plan[(0, 1)]
        rows[0], rows[1] = rows[1], rows[0]

    scenario.build(swap)
    result = await scenario.verify()
    (p,) = only(result, "order")
    named(p, 0, scenario.topic, 1)
    assert {x.kind for x in result.problems} <= {"order", "seq", "checksum"}


async def test_value_altered(scenario: Scenario) -> None:
    def alter(plan: dict[tuple[int, int], list[BackupRec]]) -> None:
        plan[(2, 1)][0].value = b"w2!"

    scenario.build(alter)
    result = await scenario.verify()
    (p,) = only(result, "altered")
    named(p, 2, scenario.topic, 1)
    assert "value" in p.message and "offsets 2" in p.message
    assert {x.kind for x in result.problems} == {"altered", "checksum"}


async def test_header_altered(scenario: Scenario) -> None:
    def alter(plan: dict[tuple[int, int], list[BackupRec]]) -> None:
        r = plan[(0, 0)][0]
        # the original headers were h=1, h=2, n=None: drop the None value
        r.headers = [("h", b"1"), ("h", b"2"), ("n", b""), *r.headers[3:]]

    scenario.build(alter)
    result = await scenario.verify()
    (p,) = only(result, "altered")
    named(p, 0, scenario.topic, 0)
    assert "headers" in p.message


async def test_timestamp_altered(scenario: Scenario) -> None:
    def alter(plan: dict[tuple[int, int], list[BackupRec]]) -> None:
        plan[(2, 1)][1].ts += 1

    scenario.build(alter)
    result = await scenario.verify()
    (p,) = only(result, "altered")
    named(p, 2, scenario.topic, 1)
    assert "timestamp" in p.message


async def test_manifest_rewritten(scenario: Scenario) -> None:
    def rewrite(ms: list[Manifest]) -> list[Manifest]:
        changed = portion_manifest(ms[1], 0, next_offset=ms[1].portions[0].next_offset - 1)
        return [ms[0], ms[1], changed, ms[2]]

    scenario.build(edit=rewrite)
    result = await scenario.verify()
    (p,) = only(result, "manifest-conflict")
    assert p.set_id == 1 and "set 1" in p.message and "next_offset" in p.message


async def test_identical_manifest_twice(scenario: Scenario) -> None:
    scenario.build(edit=lambda ms: [ms[0], ms[0], ms[1], ms[2]])
    result = await scenario.verify()
    assert [p.kind for p in result.problems] == ["duplicate-manifest"]


async def test_cut_not_a_prefix(scenario: Scenario) -> None:
    def gap(ms: list[Manifest]) -> list[Manifest]:
        p = ms[2].portions[0]
        ms[2] = portion_manifest(ms[2], 0, first_offset=p.first_offset + 1)
        return ms

    scenario.build(edit=gap)
    result = await scenario.verify()
    (p,) = only(result, "gap")
    named(p, 2, scenario.topic, 0)
    assert "[6, 7)" in p.message


async def test_set_ids_not_contiguous(scenario: Scenario) -> None:
    scenario.build(edit=lambda ms: [ms[0], ms[2]])
    result = await scenario.verify()
    (p,) = only(result, "set-gap")
    assert p.set_id == 2 and "1" in p.message


async def test_late_count_wrong(scenario: Scenario) -> None:
    def wrong(ms: list[Manifest]) -> list[Manifest]:
        assert ms[1].portions[0].late == 1
        ms[1] = portion_manifest(ms[1], 0, late=0)
        return ms

    scenario.build(edit=wrong)
    result = await scenario.verify()
    assert [p.kind for p in result.problems] == ["late-count"]
    named(result.problems[0], 1, scenario.topic, 0)


async def test_record_after_window_end(scenario: Scenario) -> None:
    # set 0 of partition 0 wrongly takes the record stamped 1500 (after T_0 = +1000)
    scenario.cut(move={(0, 0): 1})
    scenario.build()
    result = await scenario.verify()
    (p,) = only(result, "timestamp")
    named(p, 0, scenario.topic, 0)
    assert "offsets 3" in p.message
    assert {x.kind for x in result.problems} == {"timestamp"}


async def test_render_lists_problems(scenario: Scenario) -> None:
    scenario.build(lambda plan: plan[(0, 0)].pop(1))
    result = await scenario.verify()
    out = io.StringIO()
    render(result, Console(file=out, width=200))
    text = out.getvalue()
    assert "missing" in text and "problem" in text
    assert text.strip().endswith(f"{len(result.problems)} problems") or "1 problem" in text


def commit_group(scenario: Scenario, offsets: dict[int, int]) -> None:
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({"bootstrap.servers": scenario.bootstrap, "group.id": scenario.group})
    try:
        tps = [TopicPartition(scenario.topic, p, o) for p, o in offsets.items()]
        c.commit(offsets=tps, asynchronous=False)
    finally:
        c.close()


async def test_group_offsets_at_cuts_are_ok(scenario: Scenario) -> None:
    ms = scenario.build()
    commit_group(scenario, {0: ms[1].portions[0].next_offset, 1: ms[2].portions[1].next_offset})
    result = await scenario.verify()
    assert result.ok, [p.message for p in result.problems]


async def test_group_offset_beyond_last_cut(scenario: Scenario) -> None:
    ms = scenario.build(edit=lambda ms: ms[:2])
    cut = ms[1].portions[0].next_offset
    commit_group(scenario, {0: cut + 1})
    result = await scenario.verify()
    (p,) = only(result, "offset-ahead")
    assert p.portion == (scenario.topic, 0)
    assert str(cut) in p.message and str(cut + 1) in p.message


async def test_transactional_backup_with_aborted_zombie(scenario: Scenario) -> None:
    """Owners write each set in a transaction: markers leave offset gaps, and an aborted
    transaction of a fenced owner lies inside a set's range; neither may count."""
    plan = scenario.backup_plan()
    owner = Producer(
        {"bootstrap.servers": scenario.bootstrap, "transactional.id": "o-" + scenario.group}
    )
    zombie = Producer(
        {"bootstrap.servers": scenario.bootstrap, "transactional.id": "z-" + scenario.group}
    )
    owner.init_transactions(10)
    zombie.init_transactions(10)
    ranges: dict[tuple[int, int], list[int]] = {}

    def send(p: Producer, partition: int, r: BackupRec, key: tuple[int, int] | None) -> None:
        def done(err: Any, msg: Any) -> None:
            assert err is None, err
            if key is not None:
                ranges.setdefault(key, []).append(msg.offset())

        p.produce(
            scenario.backup_topic,
            key=r.key,
            value=r.value,
            partition=partition,
            headers=r.headers or None,
            timestamp=r.ts,
            on_delivery=done,
        )

    for set_id in range(SETS):
        if set_id == 1:  # a zombie's half-written set 1, then aborted
            zombie.begin_transaction()
            for r in plan[(1, 0)]:
                hs = [(k, b"w-dead" if k == "tandem.owner" else v) for k, v in r.headers]
                send(zombie, 0, BackupRec(r.key, b"zombie", hs, r.ts), None)
            zombie.flush(10)
            zombie.abort_transaction(10)
        owner.begin_transaction()
        for partition in scenario.primary:
            for r in plan[(set_id, partition)]:
                send(owner, partition, r, (set_id, partition))
        owner.commit_transaction(10)
    for (set_id, partition), offs in ranges.items():
        scenario.backup_offsets[(set_id, partition)] = (offs[0], offs[-1] + 1)
    for set_id in range(SETS):
        for partition in scenario.primary:
            scenario.backup_offsets.setdefault((set_id, partition), (-1, -1))
    ms = scenario.manifests()
    # the zombie's records lie in set 1's range only if the range is widened to them
    zb = scenario.backup_offsets[(0, 0)][1]
    ms[1] = portion_manifest(ms[1], 0, backup_first_offset=zb)
    scenario.write_manifests(ms)
    result = await scenario.verify()
    assert result.ok, [p.message for p in result.problems]
    assert result.portions[(scenario.topic, 0)].ignored >= len(plan[(1, 0)])
