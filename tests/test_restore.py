"""``tandem restore`` from sets real workers committed, into a second embedded broker.

One module fixture backs up two topics with two worker processes: keyed records with
headers, a transaction (its commit marker leaves a gap in primary offsets, so restored
offsets differ from primary ones), an application group's committed offsets, and, last,
records stamped an hour ahead, which are mirrored but cannot be in a committed set yet.
The workers are then stopped, so every test sees the same sets. Each test restores into a
fresh target broker and compares, record by record, with the primary read independently.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition
from confluent_kafka import Consumer, Producer
from confluent_kafka import TopicPartition as CTopicPartition

from connector.broker import EmbeddedBroker
from connector.config import ClusterConfig, Settings, load_settings
from connector.errors import TopicError, UsageError
from connector.fleet import WorkerProcess
from connector.messages import Manifest
from connector.mirror import read_copies
from connector.reader import partition_ends, standalone_consumer
from connector.restore import restore
from connector.restore_plan import (
    RestoreRequest,
    RestoreResult,
    parse_time,
    parse_topic_map,
    select_set,
)
from tests.conftest import create_topics
from tests.support import control, covered, manifests, produce, read_all, wait_for, worker_config

pytestmark = pytest.mark.slow

Portion = tuple[str, int]
Fields = tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]], int, int]
FUTURE = 50  # records stamped an hour ahead: mirrored, in no committed set


@dataclass
class Backup:
    bootstrap: str
    config: Path
    settings: Settings
    shapes: dict[str, int]
    sets: dict[int, Manifest]
    app_group: str
    app_offsets: dict[Portion, int]  # what the application committed on the primary

    def cut(self, set_id: int) -> dict[Portion, int]:
        return {(p.topic, p.partition): p.next_offset for p in self.sets[set_id].portions}

    def primary(self) -> dict[Portion, list[Fields]]:
        """Every primary record, with its offset, read straight from the primary."""
        out: dict[Portion, list[Any]] = {}
        for topic, n in self.shapes.items():
            for p, records in asyncio.run(read_all(self.bootstrap, topic, n)).items():
                out[(topic, p)] = records
        return out


@pytest.fixture(scope="module")
def backed_up(bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backup]:
    tmp = tmp_path_factory.mktemp("restore")
    unique = f"{time.time_ns() % 10**10:010d}"
    group, app = f"r-{unique}", f"app-{unique}"
    shapes = {f"ra-{unique}": 3, f"rb-{unique}": 2}
    a, b = list(shapes)
    create_topics(bootstrap, shapes)
    config = worker_config(tmp, bootstrap, group, list(shapes), checkpoint_groups=[app])
    fleet = [WorkerProcess(f"w{i}", config, tmp).start() for i in range(2)]
    try:
        wait_for(lambda: control(bootstrap, group).latest_map is not None, 60, "a map", fleet)
        tx = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"tx-{unique}"})
        tx.init_transactions(30)
        tx.begin_transaction()
        for i in range(10):
            tx.produce(a, key=f"tx{i}".encode(), value=b"in a transaction", partition=0)
        tx.commit_transaction(30)
        counts: Counter[Portion] = Counter({(a, 0): 10})
        counts += produce(bootstrap, a, 1500, prefix="one-")
        counts += produce(bootstrap, b, 400, prefix="one-")
        wait_for(lambda: covered(bootstrap, group, counts), 60, "round one in sets", fleet)

        primary = {**asyncio.run(read_all(bootstrap, a, 3))}
        app_offsets = {(a, 0): primary[0][len(primary[0]) // 2].offset, (a, 2): 0}
        app_consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": app})
        app_consumer.commit(
            offsets=[CTopicPartition(t, p, o) for (t, p), o in app_offsets.items()],
            asynchronous=False,
        )
        app_consumer.close()

        counts += produce(bootstrap, a, 1500, prefix="two-")
        counts += produce(bootstrap, b, 400, prefix="two-")
        wait_for(lambda: covered(bootstrap, group, counts), 60, "round two in sets", fleet)

        ahead = int(time.time() * 1000) + 3_600_000
        p = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
        for i in range(FUTURE):
            p.produce(a, key=b"future", value=f"f{i}".encode(), partition=1, timestamp=ahead)
        assert p.flush(30) == 0
        last_seq = counts[(a, 1)] - 1
        wait_for(
            lambda: (
                sum(
                    c.seq > last_seq
                    for c in asyncio.run(
                        read_copies(
                            {"bootstrap_servers": bootstrap}, f"{group}.mirror", 8, [(a, 1)]
                        )
                    )[(a, 1)]
                )
                >= FUTURE
            ),
            30,
            "the future records mirrored",
            fleet,
        )
    finally:
        for w in fleet:
            w.terminate()
    sets = manifests(bootstrap, group)
    assert sorted(sets) == list(range(len(sets)))
    last = sets[max(sets)]
    assert {c.group for c in last.checkpoints} == {app}
    yield Backup(
        bootstrap=bootstrap,
        config=config,
        settings=load_settings(config),
        shapes=shapes,
        sets=sets,
        app_group=app,
        app_offsets=app_offsets,
    )


@pytest.fixture
def target() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as broker:
        yield broker


def run_restore(b: Backup, to: str, **kwargs: Any) -> RestoreResult:
    request = RestoreRequest(target=ClusterConfig(bootstrap_servers=to), **kwargs)
    return asyncio.run(restore(b.settings, request))


def tandem(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connector", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def fields(r: Any) -> Fields:
    return (r.key, r.value, list(r.headers), r.timestamp, r.timestamp_type)


def target_records(to: str, shapes: dict[str, int]) -> dict[Portion, list[Fields]]:
    out: dict[Portion, list[Fields]] = {}
    for topic, n in shapes.items():
        for p, records in asyncio.run(read_all(to, topic, n)).items():
            out[(topic, p)] = [fields(r) for r in records]
    return out


def target_counts(to: str, shapes: dict[str, int]) -> int:
    async def count() -> int:
        tps = [TopicPartition(t, p) for t, n in shapes.items() for p in range(n)]
        async with standalone_consumer({"bootstrap_servers": to}) as consumer:
            ends = await partition_ends(consumer, tps)
        return sum(end - start for start, end in ends.values())

    try:
        return asyncio.run(count())
    except TopicError:  # not created yet
        return 0


def assert_prefix(b: Backup, to: str, cut: dict[Portion, int], skip: int = 0) -> int:
    """The target holds, per partition, exactly the primary records below the cut."""
    primary = b.primary()
    restored = target_records(to, b.shapes)
    total = 0
    for portion in sorted(primary):
        want = [fields(r) for r in primary[portion] if r.offset < cut[portion]]
        got = restored.get(portion, [])[skip:]
        assert len(got) == len(want), f"{portion}: {len(got)} restored, {len(want)} expected"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert g == w, f"{portion} record {i}: {g!r} != {w!r}"
        total += len(want)
    return total


def test_restore_a_middle_set_then_extend_to_the_last(backed_up: Backup, target) -> None:
    b = backed_up
    last = max(b.sets)
    middle = next(s for s in sorted(b.sets) if b.cut(s)[(next(iter(b.shapes)), 0)] > 100)
    assert middle < last and b.cut(middle) != b.cut(last), "need two different cuts"

    result = run_restore(b, target.bootstrap, set_id=middle)
    assert result.ok, result.problems
    assert result.written == assert_prefix(b, target.bootstrap, b.cut(middle)) > 0

    # set N's records are a prefix of set N+k's: the same target extends to the last set
    result = run_restore(b, target.bootstrap, set_id=last)
    assert result.ok, result.problems
    total = assert_prefix(b, target.bootstrap, b.cut(last))
    assert result.written == total - sum(p.present for p in result.partitions) > 0

    again = run_restore(b, target.bootstrap, set_id=last)  # idempotent
    assert again.ok and again.written == 0 and again.records == total
    assert_prefix(b, target.bootstrap, b.cut(last))

    with pytest.raises(UsageError, match="restored from a later set"):
        run_restore(b, target.bootstrap, set_id=middle)


def test_restore_killed_midway_then_rerun_gives_one_copy(backed_up: Backup, target) -> None:
    b = backed_up
    last = max(b.sets)
    total = sum(p.count for m in b.sets.values() for p in m.portions)
    args = ["restore", "--config", str(b.config), "--to", target.bootstrap, "--json"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "connector", *args, "--max-rate", "1500"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: target_counts(target.bootstrap, b.shapes) > 500, 60, "restore under way")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    present = target_counts(target.bootstrap, b.shapes)
    assert 0 < present < total, "killed mid-way"

    done = tandem(*args)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout)
    assert summary["ok"] and summary["set_id"] == last and summary["consistent_cut"]
    assert summary["written"] == total - present
    assert assert_prefix(b, target.bootstrap, b.cut(last)) == total


def test_translated_offsets_resume_after_the_last_processed_record(
    backed_up: Backup, target
) -> None:
    b = backed_up
    result = run_restore(b, target.bootstrap)
    assert result.ok, result.problems
    primary = b.primary()
    consumer = Consumer(
        {
            "bootstrap.servers": target.bootstrap,
            "group.id": b.app_group,
            "auto.offset.reset": "error",  # no committed offset would fail, not start anywhere
            "enable.auto.commit": False,
        }
    )
    advanced: dict[Portion, int] = {}
    try:
        for (topic, partition), offset in b.app_offsets.items():
            want = next(r for r in primary[(topic, partition)] if r.offset >= offset)
            consumer.assign([CTopicPartition(topic, partition)])
            msg = None
            deadline = time.monotonic() + 15
            while msg is None and time.monotonic() < deadline:
                msg = consumer.poll(0.5)
            assert msg is not None and msg.error() is None, msg and msg.error()
            assert (msg.key(), msg.value()) == (want.key, want.value)
            assert msg.timestamp()[1] == want.timestamp
            if topic == next(iter(b.shapes)) and partition == 0:
                # the transaction's commit marker took a primary offset the target lacks
                assert msg.offset() == offset - 1
            moved = CTopicPartition(topic, partition, msg.offset() + 5)
            consumer.commit(offsets=[moved], asynchronous=False)
            advanced[(topic, partition)] = moved.offset
        # a rerun must not rewind the application, which has consumed on the target since
        again = run_restore(b, target.bootstrap)
        assert again.ok and again.written == 0
        assert {(o.topic, o.partition): o.kept for o in again.offsets} == advanced
        committed = consumer.committed([CTopicPartition(t, p) for t, p in advanced], timeout=10)
        assert {(tp.topic, tp.partition): tp.offset for tp in committed} == advanced
    finally:
        consumer.close()


def test_include_unsecured_restores_the_mirrored_tail(backed_up: Backup, target) -> None:
    b = backed_up
    done = tandem(
        "restore", "--config", str(b.config), "--to", target.bootstrap, "--include-unsecured"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "UNSECURED" in done.stdout and "not a consistent cut" in done.stdout
    a = next(iter(b.shapes))
    cut = b.cut(max(b.sets))
    cut[(a, 1)] += FUTURE
    assert_prefix(b, target.bootstrap, cut)


def test_errors(backed_up: Backup, target, make_topics) -> None:
    b = backed_up
    base = ["restore", "--config", str(b.config), "--to", target.bootstrap]

    missing = tandem(*base, "--set", "99999")
    assert missing.returncode == 2
    assert "set 99999 does not exist" in missing.stderr

    early = tandem(*base, "--time", "2001-01-01T00:00:00Z")
    assert early.returncode == 2 and "no set ends at or before" in early.stderr

    dry = tandem(*base, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "dry run" in dry.stdout and "nothing written" in dry.stdout
    assert target_counts(target.bootstrap, b.shapes) == 0

    a, bt = list(b.shapes)
    make_topics(target.bootstrap, {bt: 5})
    wrong = tandem(*base)
    assert wrong.returncode == 2
    assert f"target topic {bt}" in wrong.stderr and "has 5 partitions" in wrong.stderr

    # the same restore elsewhere, past foreign data
    mapped = [*base, "--topic-map", f"{bt}:{bt}-restored"]
    make_topics(target.bootstrap, {a: 3})
    p = Producer({"bootstrap.servers": target.bootstrap})
    p.produce(a, value=b"someone else's", partition=1)
    assert p.flush(10) == 0
    refused = tandem(*mapped)
    assert refused.returncode == 2 and f"target topic {a} is not empty" in refused.stderr
    forced = tandem(*mapped, "--force", "--json")
    assert forced.returncode == 0, forced.stdout + forced.stderr
    summary = json.loads(forced.stdout)
    assert [(x["partition"], x["base"]) for x in summary["partitions"] if x["topic"] == a] == [
        (0, 0),
        (1, 1),
        (2, 0),
    ]
    again = tandem(*mapped, "--json")  # its own plan: resumes without --force
    assert again.returncode == 0 and json.loads(again.stdout)["written"] == 0
    shapes = {a: 3, f"{bt}-restored": 2}
    assert target_counts(target.bootstrap, shapes) == 1 + summary["records"]


def test_set_selection_by_time() -> None:
    def m(set_id: int, end: int) -> Manifest:
        return Manifest(
            set_id=set_id,
            group="g",
            window_start_ms=end - 2000,
            window_end_ms=end,
            committed_ms=end + 900,
            epoch=1,
            coordinator="w",
            members=["w"],
            portions=[],
        )

    sets = {i: m(i, 1_700_000_002_000 + 2000 * i) for i in range(4)}
    assert select_set(sets, None, 1_700_000_006_000, False).set_id == 2  # ends exactly at T
    assert select_set(sets, None, 1_700_000_005_999, False).set_id == 1
    assert select_set(sets, None, None, False).set_id == 3
    assert select_set(sets, None, parse_time("2023-11-14T22:13:26Z"), False).set_id == 2
    with pytest.raises(UsageError, match="not the last"):
        select_set(sets, 1, None, True)
    with pytest.raises(UsageError, match="neither epoch"):
        parse_time("yesterday")
    assert parse_topic_map(["a:b", "c:d"]) == {"a": "b", "c": "d"}
    with pytest.raises(UsageError, match="not SOURCE:TARGET"):
        parse_topic_map(["a-b"])
