"""Issue 10 from outside: broker stalls, topology changes while running, hostile input.

Every case ends with the same check as the chaos test: committed sets cover every
acknowledged update, ``tandem verify`` compares primary and backup byte for byte, and the
mirror topic shows no sequence number given to two records.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from connector.broker import EmbeddedBroker
from connector.config import load_settings
from connector.fleet import SteadyProducer, WorkerProcess
from connector.sets import OFFSET_HEADER
from connector.timeline import read_timeline
from connector.verify import verify
from tests.conftest import create_topics
from tests.support import (
    control,
    covered,
    manifests,
    produce,
    read_all,
    run_verify,
    wait_for,
    worker_config,
)
from tests.test_metrics import free_port, one, scrape

pytestmark = pytest.mark.slow

SLOTS = 8


def check_backup(bootstrap: str, group: str, config: Path, counts, fleet) -> None:
    """Sets cover every acknowledged update, verify passes, no sequence number reused."""
    wait_for(lambda: covered(bootstrap, group, counts), 90, f"{group}: sets covering all", fleet)
    result = run_verify(config)
    assert result.returncode == 0, result.stdout + result.stderr
    t = asyncio.run(read_timeline({"bootstrap_servers": bootstrap}, group, SLOTS))
    assert not t.reused, t.reused[:5]


def test_a_ten_second_broker_stall_under_load_loses_nothing(unique: str, tmp_path: Path) -> None:
    """SIGSTOP the only broker for 10 s while producers write; the workers recover alone."""
    group, topic = f"st-{unique}", f"t-{unique}"
    with EmbeddedBroker() as broker:
        bootstrap = broker.bootstrap
        create_topics(bootstrap, {topic: 4})
        config = worker_config(tmp_path, bootstrap, group, [topic])
        urls = {}
        fleet = []
        for name in ("w0", "w1"):
            port = free_port()
            urls[name] = f"http://127.0.0.1:{port}"
            env = {"TANDEM_HTTP__LISTEN": f"127.0.0.1:{port}"}
            fleet.append(WorkerProcess(name, config, tmp_path, env=env).start())
        producer = SteadyProducer(bootstrap, [topic], rate=300).start()
        try:
            wait_for(lambda: len(manifests(bootstrap, group)) >= 3, 60, "sets committing", fleet)
            broker.pause()
            paused = time.monotonic()
            # While it lasts the stall is visible: the last set ages on every worker.
            rpo: dict[str, float] = {}
            while time.monotonic() - paused < 10:
                for name, url in urls.items():
                    rpo[name] = one(scrape(url), "tandem_rpo_seconds")
                time.sleep(0.5)
            broker.resume()
            resumed_ms = int(time.time() * 1000)
            assert all(v >= 8 for v in rpo.values()), rpo

            def caught_up() -> bool:
                ms = manifests(bootstrap, group).values()
                return any(m.window_end_ms > resumed_ms for m in ms)

            # Recovered: a set whose window ended after SIGCONT is committed, so the sets
            # held up by the stall are all through.
            wait_for(caught_up, 90, "a set of a window after the stall", fleet)
            ms = manifests(bootstrap, group).values()
            first = min((m for m in ms if m.window_end_ms > resumed_ms), key=lambda m: m.set_id)
            print(
                f"broker stall 10 s: caught up {(first.committed_ms - resumed_ms) / 1000:.1f} s "
                f"after SIGCONT (set {first.set_id}); rpo at the end of the stall "
                f"{max(rpo.values()):.1f} s"
            )
            time.sleep(3)
            counts = producer.stop()
            assert producer.failed == 0
            assert all(w.alive for w in fleet), [w.log_tail() for w in fleet]
            check_backup(bootstrap, group, config, counts, fleet)
        finally:
            producer.stop()
            for w in fleet:
                w.terminate()


# Apache Kafka's default message.max.bytes (1 MiB + 12): a record as large as a default
# broker takes, minus room for its key and headers.
MAX_RECORD_VALUE = 1_048_588 - 1024


def hostile_records(bootstrap: str, topic: str, partitions: int) -> Counter[tuple[str, int]]:
    """Records at the size limit, empty and null keys and values, binary headers."""
    junk = bytes(range(256))
    cases: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]] = [
        (b"big", bytes(MAX_RECORD_VALUE), []),
        (b"", b"", []),
        (None, b"", []),
        (b"gone", None, []),  # a tombstone
        (None, None, [("h", None)]),
        (junk, junk, [("bin", junk), ("bin", b"\x00"), ("", b""), ("\u00e9", None)]),
    ]
    counts: Counter[tuple[str, int]] = Counter()
    failures: list[str] = []

    def delivered(err: object, msg: Any) -> None:
        if err is not None:
            failures.append(str(err))
        else:
            counts[(msg.topic(), msg.partition())] += 1

    p = Producer({"bootstrap.servers": bootstrap, "message.max.bytes": 2_000_000})
    for partition in range(partitions):
        for key, value, headers in cases:
            p.produce(
                topic,
                key=key,
                value=value,
                headers=headers or None,
                partition=partition,
                on_delivery=delivered,
            )
    assert p.flush(30) == 0
    assert not failures, failures
    return counts


def inject_garbage(bootstrap: str, group: str) -> int:
    """Records some other program wrote to the group's internal topics; returns how many."""
    p = Producer({"bootstrap.servers": bootstrap})
    schema = [("tandem.schema", b"MirrorEnvelope@0000")]
    n = 0
    for topic, partitions in (
        (f"{group}.control", 1),
        (f"{group}.mirror", SLOTS),
        (f"{group}.sets", 1),
    ):
        for partition in range(partitions):
            for value, headers in ((b"\xff\x00garbage", schema), (b"not avro", None), (None, None)):
                p.produce(topic, key=b"x", value=value, headers=headers, partition=partition)
                n += 1
    assert p.flush(30) == 0
    return n


def test_hostile_input_two_groups_and_a_mismatched_config(
    bootstrap: str, unique: str, make_topics, tmp_path: Path
) -> None:
    """Odd records are copied byte-identical by two groups with their own prefixes;
    garbage on the internal topics is skipped and counted; a worker that joins a group
    under the same name with other settings is refused."""
    topic = f"h-{unique}"
    make_topics(bootstrap, {topic: 3})
    groups = {
        g: worker_config(tmp_path, bootstrap, g, [topic]) for g in (f"ha-{unique}", f"hb-{unique}")
    }
    fleet = [
        WorkerProcess(f"{g[:2]}{i}", config, tmp_path).start()
        for g, config in groups.items()
        for i in range(2)
    ]
    a, b = groups
    try:
        for g in groups:
            wait_for(lambda g=g: len(manifests(bootstrap, g)) >= 2, 60, f"{g} sets", fleet)
        counts = hostile_records(bootstrap, topic, 3)
        garbage = inject_garbage(bootstrap, a)
        counts.update(produce(bootstrap, topic, 600))

        (tmp_path / "other").mkdir()
        interval_3 = {"interval_s": 3, "grace_s": 0.5}
        other = worker_config(tmp_path / "other", bootstrap, a, [topic], window=interval_3)
        intruder = WorkerProcess("intruder", other, tmp_path).start()
        assert intruder.proc is not None
        assert intruder.proc.wait(60) == 1, intruder.log_tail()
        assert "already runs with other settings" in intruder.log_tail()
        assert "interval_ms: 2000 (group) vs 3000 (this worker)" in intruder.log_tail()

        for g in groups:
            wait_for(
                lambda g=g: covered(bootstrap, g, counts), 90, f"{g}: sets covering all", fleet
            )
        assert all(w.alive for w in fleet), [w.log_tail() for w in fleet]
        # Every worker of group a read the garbage on control and on its mirror slot.
        seen = control(bootstrap, a).announcements
        assert all(seen[w].malformed >= 3 for w in ("ha0", "ha1")), {
            w: x.malformed for w, x in seen.items()
        }
        assert all(
            "skipping malformed record" in w.log_path.read_text()
            for w in fleet
            if w.name.startswith("ha")
        )
        # Group b never saw any of it; verify reports the foreign records on a's sets topic
        # and nothing else.
        assert sum(x.malformed for x in control(bootstrap, b).announcements.values()) == 0
        result = run_verify(groups[b])
        assert result.returncode == 0, result.stdout + result.stderr
        checked = asyncio.run(verify(load_settings(groups[a]), all_sets=True))
        assert set(checked.kinds()) == {"malformed-manifest"}, checked.problems[:5]
        assert checked.records_checked >= sum(counts.values())
        for g in groups:
            t = asyncio.run(read_timeline({"bootstrap_servers": bootstrap}, g, SLOTS))
            assert not t.reused, t.reused[:5]
        print(f"{garbage} foreign records on {a}'s internal topics skipped")
    finally:
        for w in fleet:
            w.terminate()


def test_regex_subscription_follows_topics_created_and_deleted_while_running(
    bootstrap: str, unique: str, make_topics, tmp_path: Path
) -> None:
    """A topic created while the group runs is backed up from its first record; a deleted
    one is reported and the sets of the others go on."""
    group = f"rx-{unique}"
    kept, added, deleted = (f"rx-{unique}-{n}" for n in ("kept", "added", "deleted"))
    make_topics(bootstrap, {kept: 2, deleted: 2, f"other-{unique}": 1})
    source = {
        "bootstrap_servers": bootstrap,
        "topic_regex": f"rx-{unique}-.*",
        "session_timeout_ms": 6000,
        "metadata_max_age_ms": 1000,
    }
    config = worker_config(tmp_path, bootstrap, group, [], source=source)
    fleet = [WorkerProcess(f"w{i}", config, tmp_path).start() for i in range(2)]
    producer = SteadyProducer(bootstrap, [kept], rate=200).start()

    def mapped() -> set[str]:
        m = control(bootstrap, group).latest_map
        return {p.topic for p in m.portions} if m else set()

    try:
        wait_for(lambda: mapped() == {kept, deleted}, 60, "the matching topics mapped", fleet)
        wait_for(lambda: len(manifests(bootstrap, group)) >= 2, 60, "sets committing", fleet)
        counts = produce(bootstrap, deleted, 100)
        wait_for(lambda: covered(bootstrap, group, counts), 60, f"{deleted} backed up", fleet)

        make_topics(bootstrap, {added: 3})
        counts = produce(bootstrap, added, 300)  # before the group can know of the topic
        wait_for(lambda: added in mapped(), 60, f"{added} in the map", fleet)
        wait_for(lambda: covered(bootstrap, group, counts), 60, f"{added} backed up", fleet)
        backup = asyncio.run(read_all(bootstrap, f"{group}-backup.{added}", 3))
        for partition, records in backup.items():
            # Read from its first record: primary offsets 0, 1, 2, ... in every partition.
            offsets = [int(dict(r.headers)[OFFSET_HEADER]) for r in records]
            assert offsets == list(range(counts[(added, partition)])), (partition, offsets[:5])

        admin = AdminClient({"bootstrap.servers": bootstrap})
        for fut in admin.delete_topics([deleted], operation_timeout=15).values():
            fut.result(15)
        wait_for(lambda: mapped() == {kept, added}, 60, f"{deleted} out of the map", fleet)
        after = max(manifests(bootstrap, group))
        wait_for(lambda: max(manifests(bootstrap, group)) >= after + 3, 60, "sets go on", fleet)
        assert any(
            f"primary topic {deleted} is no longer in the map" in w.log_path.read_text()
            for w in fleet
        )
        counts = producer.stop()
        assert producer.failed == 0
        wait_for(lambda: covered(bootstrap, group, counts), 90, "sets covering all", fleet)
        assert all(w.alive for w in fleet), [w.log_tail() for w in fleet]
        t = asyncio.run(read_timeline({"bootstrap_servers": bootstrap}, group, SLOTS))
        assert not t.reused, t.reused[:5]
    finally:
        producer.stop()
        for w in fleet:
            w.terminate()
