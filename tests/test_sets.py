"""Protocol steps 3 and 4 from outside: consistent sets, checked by `tandem verify`."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Producer

from connector.fleet import WorkerProcess
from connector.messages import Manifest
from tests.support import control, covered, manifests, produce, wait_for, worker_config

pytestmark = pytest.mark.slow


def run_verify(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "connector", "verify", "--config", str(config), "--all"],
        capture_output=True,
        text=True,
        timeout=180,
    )


def set_of(ms: dict[int, Manifest], topic: str, partition: int, offset: int) -> int:
    for m in ms.values():
        for p in m.portions:
            if (p.topic, p.partition) == (
                topic,
                partition,
            ) and p.first_offset <= offset < p.next_offset:
                return m.set_id
    raise AssertionError(f"{topic}[{partition}]@{offset} is in no committed set")


def test_workload_with_idle_partitions_late_records_and_a_transaction(
    bootstrap: str, unique: str, make_topics, tmp_path: Path
) -> None:
    group = f"s-{unique}"
    busy, quiet = f"busy-{unique}", f"quiet-{unique}"
    make_topics(bootstrap, {busy: 4, quiet: 4})
    config = worker_config(tmp_path, bootstrap, group, [busy, quiet])
    fleet = [WorkerProcess(f"w{i}", config, tmp_path).start() for i in range(3)]
    try:
        wait_for(lambda: control(bootstrap, group).latest_map is not None, 60, "a map", fleet)
        counts: Counter[tuple[str, int]] = Counter()
        for _ in range(3):  # several producers over several windows
            counts += produce(bootstrap, busy, 1500)
            time.sleep(1)
        # quiet: partitions 2 and 3 stay idle for the whole test.
        p = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
        late_ts = int(time.time() * 1000) - 60_000
        delivered: list[tuple[str, int, int]] = []

        def note(err: object, msg: object) -> None:
            assert err is None, err
            delivered.append((msg.topic(), msg.partition(), msg.offset()))  # type: ignore[attr-defined]

        for i in range(20):
            p.produce(quiet, value=f"q{i}".encode(), partition=i % 2, on_delivery=note)
        for i in range(5):  # stamped a minute ago: they arrive after their window sealed
            p.produce(
                busy,
                value=f"late{i}".encode(),
                partition=i % 4,
                timestamp=late_ts,
                on_delivery=note,
            )
        assert p.flush(30) == 0
        for t, part, _ in delivered:
            counts[(t, part)] += 1
        # One multi-partition transaction, all records with one shared timestamp.
        tx = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"app-{unique}"})
        tx.init_transactions(30)
        tx.begin_transaction()
        shared_ts = int(time.time() * 1000)
        tx_records: list[tuple[str, int, int]] = []

        def note_tx(err: object, msg: object) -> None:
            assert err is None, err
            tx_records.append((msg.topic(), msg.partition(), msg.offset()))  # type: ignore[attr-defined]

        for i in range(12):
            tx.produce(
                busy if i % 2 else quiet,
                value=f"tx{i}".encode(),
                partition=i % 2,
                timestamp=shared_ts,
                on_delivery=note_tx,
            )
        tx.flush(30)
        tx.commit_transaction(30)
        for t, part, _ in tx_records:
            counts[(t, part)] += 1
        counts += produce(bootstrap, busy, 500)

        wait_for(lambda: covered(bootstrap, group, counts), 90, "all records in sets", fleet)
        assert all(w.alive for w in fleet)
    finally:
        for w in fleet:
            w.terminate()

    ms = manifests(bootstrap, group)
    assert sorted(ms) == list(range(len(ms))), "set ids are contiguous from 0"
    assert len({set_of(ms, *r) for r in tx_records}) == 1, "the transaction was split"
    assert sum(m.late for m in ms.values()) >= 5
    for m in ms.values():  # idle partitions are sealed every set, empty
        for part in m.portions:
            if part.topic == quiet and part.partition >= 2:
                assert part.count == 0
    result = run_verify(config)
    assert result.returncode == 0, result.stdout + result.stderr


def test_coordinator_killed_mid_set(
    bootstrap: str, unique: str, make_topics, tmp_path: Path
) -> None:
    group = f"c-{unique}"
    topic = f"t-{unique}"
    make_topics(bootstrap, {topic: 6})
    config = worker_config(tmp_path, bootstrap, group, [topic])
    fleet = {f"w{i}": WorkerProcess(f"w{i}", config, tmp_path).start() for i in range(3)}
    try:
        wait_for(
            lambda: len(manifests(bootstrap, group)) >= 2, 60, "two sets", list(fleet.values())
        )
        counts = produce(bootstrap, topic, 3000)
        first = control(bootstrap, group).latest_map
        assert first is not None
        coordinator = first.coordinator
        before = max(manifests(bootstrap, group))
        fleet[coordinator].kill()  # SIGKILL while sets are forming
        for _ in range(4):
            counts += produce(bootstrap, topic, 1000)
            time.sleep(1)
        survivors = [w for n, w in fleet.items() if n != coordinator]
        wait_for(lambda: covered(bootstrap, group, counts), 120, "sets after the kill", survivors)
        after = control(bootstrap, group).latest_map
        assert after is not None and after.coordinator != coordinator
        ms = manifests(bootstrap, group)
        assert max(ms) > before
        assert {m.coordinator for m in ms.values() if m.set_id > before + 3} <= {after.coordinator}
    finally:
        for w in fleet.values():
            w.terminate()
    assert sorted(ms) == list(range(len(ms))), "no gap in set ids"
    result = run_verify(config)
    assert result.returncode == 0, result.stdout + result.stderr
