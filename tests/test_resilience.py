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
from confluent_kafka import (
    ConsumerGroupTopicPartitions,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewPartitions

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
from tests.test_metrics import free_port, one, scrape, total

pytestmark = pytest.mark.slow

SLOTS = 8


def check_backup(bootstrap: str, group: str, config: Path, counts, fleet) -> None:
    """Sets cover every acknowledged update, verify passes, no sequence number reused.

    ``bootstrap`` is the backup cluster's: manifests and the mirror topic live there.
    """
    wait_for(lambda: covered(bootstrap, group, counts), 90, f"{group}: sets covering all", fleet)
    result = run_verify(config)
    assert result.returncode == 0, result.stdout + result.stderr
    t = asyncio.run(read_timeline({"bootstrap_servers": bootstrap}, group, SLOTS))
    assert not t.reused, t.reused[:5]


def rss_mb(w: WorkerProcess) -> float:
    assert w.proc is not None
    status = Path(f"/proc/{w.proc.pid}/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1]) / 1024


def primary_committed(bootstrap: str, group: str, topic: str, partitions: int) -> int:
    """The group's committed offsets on the primary, summed: what consumer-lag tools see."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    req = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, i) for i in range(partitions)])
    (fut,) = admin.list_consumer_group_offsets([req]).values()
    return sum(max(0, tp.offset) for tp in fut.result(15).topic_partitions)


def test_broker_stalls_and_a_backup_outage_under_load_lose_nothing(
    unique: str, tmp_path: Path
) -> None:
    """Source and backup on two brokers. SIGSTOP both for 10 s (one cluster frozen), then
    only the backup for 10 s, then the backup for 15 s (seven windows) while producers
    write. The workers recover alone, the stall shows in their metrics while it lasts, the
    outage secures nothing and holds bounded memory, and afterwards everything is backed
    up exactly once."""
    group, topic, limit = f"st-{unique}", f"t-{unique}", 2000
    with EmbeddedBroker() as source, EmbeddedBroker() as backup:
        create_topics(source.bootstrap, {topic: 4})
        config = worker_config(
            tmp_path,
            source.bootstrap,
            group,
            [topic],
            source={
                "bootstrap_servers": source.bootstrap,
                "topics": [topic],
                "session_timeout_ms": 6000,
                "max_unsecured_records": limit,
            },
            backup={"bootstrap_servers": backup.bootstrap, "topic_prefix": "b."},
        )
        urls = {}
        fleet = []
        for name in ("w0", "w1"):
            port = free_port()
            urls[name] = f"http://127.0.0.1:{port}"
            env = {"TANDEM_HTTP__LISTEN": f"127.0.0.1:{port}"}
            fleet.append(WorkerProcess(name, config, tmp_path, env=env).start())
        producer = SteadyProducer(source.bootstrap, [topic], rate=300).start()

        def stall(brokers: list[EmbeddedBroker], seconds: float, what: str) -> dict[str, float]:
            """Freeze, watch from outside, thaw; returns figures once sets caught up."""
            for b in brokers:
                b.pause()
            t0 = time.monotonic()
            committed = (
                primary_committed(source.bootstrap, group, topic, 4) if source not in brokers else 0
            )
            produced = sum(producer.counts.values())
            rpo, pending, in_flight, rss = 0.0, 0.0, 0.0, 0.0
            while time.monotonic() - t0 < seconds:
                for w in fleet:
                    got = scrape(urls[w.name])
                    rpo = max(rpo, one(got, "tandem_rpo_seconds"))
                    pending = max(pending, one(got, "tandem_mirror_send_pending_seconds"))
                    in_flight = max(in_flight, total(got, "tandem_in_flight_records"))
                    rss = max(rss, rss_mb(w))
                time.sleep(0.5)
            if source not in brokers:
                # Nothing was secured: the primary offsets stood still while updates came in.
                assert primary_committed(source.bootstrap, group, topic, 4) == committed
                assert sum(producer.counts.values()) > produced + 100
            for b in brokers:
                b.resume()
            resumed_ms = int(time.time() * 1000)
            # While it lasted the stall showed: the last set aged and, with the primary
            # still delivering, a mirror send waited on the backup cluster.
            assert rpo >= seconds - 2, (what, rpo)
            assert source in brokers or pending >= seconds - 3, (what, pending)

            def caught_up() -> bool:
                return any(
                    m.window_end_ms > resumed_ms
                    for m in manifests(backup.bootstrap, group).values()
                )

            wait_for(caught_up, 90, f"a set of a window after the {what}", fleet)
            ms = manifests(backup.bootstrap, group).values()
            first = min((m for m in ms if m.window_end_ms > resumed_ms), key=lambda m: m.set_id)
            figures = {
                "recovery_s": round((first.committed_ms - resumed_ms) / 1000, 1),
                "max_rpo_s": rpo,
                "max_send_pending_s": round(pending, 1),
                "max_in_flight": in_flight,
                "max_rss_mb": round(rss),
            }
            print(f"{what} {seconds:.0f} s: {figures}")
            return figures

        try:
            wait_for(lambda: len(manifests(backup.bootstrap, group)) >= 3, 60, "sets", fleet)
            stall([source, backup], 10, "stall of both clusters")
            # A stall of only the backup cluster, longer than seven set windows.
            outage = stall([backup], 15, "backup outage")
            # Owners stop reading at the limit (plus at most one fetch of 5000 per worker).
            assert outage["max_in_flight"] <= 2 * (limit + 5000), outage
            counts = producer.stop()
            assert producer.failed == 0
            assert all(w.alive for w in fleet), [w.log_tail() for w in fleet]
            check_backup(backup.bootstrap, group, config, counts, fleet)
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
        other = worker_config(
            tmp_path / "other",
            bootstrap,
            a,
            [topic],
            window={"interval_s": 3, "grace_s": 0.5},
            backup={"topic_prefix": "other."},
        )
        intruder = WorkerProcess("intruder", other, tmp_path).start()
        assert intruder.proc is not None
        assert intruder.proc.wait(60) == 1, intruder.log_tail()
        assert "already runs with other settings" in intruder.log_tail()
        assert "interval_ms: 2000 (group) vs 3000 (this worker)" in intruder.log_tail()
        assert f"topic_prefix: '{a}-backup.' (group) vs 'other.' (this worker)" in (
            intruder.log_tail()
        )
        # Refused before it wrote anything: no backup topic under its prefix.
        listed = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=15).topics
        assert f"other.{topic}" not in listed

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


def grow(bootstrap: str, topic: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for fut in admin.create_partitions([NewPartitions(topic, partitions)]).values():
        fut.result(15)


def test_partitions_added_while_running_get_owners_and_a_grown_backup_topic(
    bootstrap: str, unique: str, make_topics, tmp_path: Path
) -> None:
    group, topic, probe = f"gp-{unique}", f"t-{unique}", f"probe-{unique}"
    make_topics(bootstrap, {probe: 1})
    try:
        grow(bootstrap, probe, 2)
    except KafkaException as exc:
        pytest.skip(f"the broker cannot add partitions to a topic: {exc.args[0].str()}")
    make_topics(bootstrap, {topic: 2})
    source = {
        "bootstrap_servers": bootstrap,
        "topics": [topic],
        "session_timeout_ms": 6000,
        "metadata_max_age_ms": 1000,
    }
    config = worker_config(tmp_path, bootstrap, group, [topic], source=source)
    fleet = [WorkerProcess(f"w{i}", config, tmp_path).start() for i in range(2)]
    producer = SteadyProducer(bootstrap, [topic], rate=200).start()
    try:
        wait_for(lambda: len(manifests(bootstrap, group)) >= 2, 60, "sets committing", fleet)
        grow(bootstrap, topic, 3)
        p = Producer({"bootstrap.servers": bootstrap})
        for i in range(100):
            p.produce(topic, key=b"new", value=f"{i}".encode(), partition=2)
        assert p.flush(30) == 0

        def mapped() -> bool:
            m = control(bootstrap, group).latest_map
            return m is not None and m.portion(topic, 2) is not None

        wait_for(mapped, 60, f"{topic}[2] in the map", fleet)
        counts = producer.stop()
        counts[(topic, 2)] += 100
        assert producer.failed == 0
        check_backup(bootstrap, group, config, counts, fleet)
        backup_partitions = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=15)
        assert len(backup_partitions.topics[f"{group}-backup.{topic}"].partitions) == 3
        first = min(
            (
                m
                for m in manifests(bootstrap, group).values()
                if any((x.topic, x.partition) == (topic, 2) and x.count for x in m.portions)
            ),
            key=lambda m: m.set_id,
        )
        new = next(x for x in first.portions if (x.topic, x.partition) == (topic, 2))
        assert (new.first_offset, new.first_seq) == (0, 0)
    finally:
        producer.stop()
        for w in fleet:
            w.terminate()
