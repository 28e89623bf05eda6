"""Metrics and probes of real worker processes after a known workload."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from connector.fleet import WorkerProcess
from connector.status import rpo_seconds
from tests.support import control, produce, wait_for, worker_config
from tests.test_sets import covered, manifests

pytestmark = pytest.mark.slow

Samples = dict[str, list[tuple[dict[str, str], float]]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def scrape(url: str) -> Samples:
    status, body = get(f"{url}/metrics")
    assert status == 200
    out: Samples = defaultdict(list)
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[s.name].append((s.labels, s.value))
    return out


def total(samples: Samples, name: str) -> float:
    return sum(v for _, v in samples.get(name, []))


def one(samples: Samples, name: str) -> float:
    (got,) = samples[name]
    return got[1]


def ready_status(url: str) -> int | None:
    try:
        return get(f"{url}/readyz")[0]
    except OSError:
        return None  # not listening yet


def test_metric_values_after_a_known_workload_and_a_failover(
    bootstrap: str, unique: str, make_topics, tmp_path: Path
) -> None:
    group, topic = f"m-{unique}", f"t-{unique}"
    make_topics(bootstrap, {topic: 4})
    config = worker_config(tmp_path, bootstrap, group, [topic])
    urls: dict[str, str] = {}
    fleet: dict[str, WorkerProcess] = {}
    for i in range(3):
        port = free_port()
        name = f"w{i}"
        urls[name] = f"http://127.0.0.1:{port}"
        env = {"TANDEM_HTTP__LISTEN": f"127.0.0.1:{port}"}
        fleet[name] = WorkerProcess(name, config, tmp_path, env=env).start()
    workers = list(fleet.values())
    try:
        # Each worker answers 503 while it joins, then 200 once it holds a map with itself.
        seen: dict[str, list[int]] = {n: [] for n in fleet}

        def all_ready() -> bool:
            for n, url in urls.items():
                status = ready_status(url)
                if status is not None and (not seen[n] or seen[n][-1] != status):
                    seen[n].append(status)
            return all(s and s[-1] == 200 for s in seen.values())

        deadline = time.monotonic() + 60
        while not all_ready():
            assert time.monotonic() < deadline, f"not ready: {seen}"
            time.sleep(0.05)
        for n in fleet:
            assert seen[n][0] == 503 and seen[n][-1] == 200, (n, seen[n])
            assert get(f"{urls[n]}/healthz") == (200, b'{"status": "alive"}')

        counts = produce(bootstrap, topic, 3000)
        p = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
        late_ts = int(time.time() * 1000) - 60_000

        def note(err: object, msg: Any) -> None:
            assert err is None, err
            counts[(msg.topic(), msg.partition())] += 1

        for i in range(5):  # stamped a minute ago: late by construction
            p.produce(topic, value=b"late", partition=i % 4, timestamp=late_ts, on_delivery=note)
        assert p.flush(30) == 0
        n_records = sum(counts.values())
        wait_for(lambda: covered(bootstrap, group, counts), 90, "all records in sets", workers)

        def settled() -> bool:
            s = [scrape(u) for u in urls.values()]
            return all(
                total(x, "tandem_in_flight_records") == 0
                and total(x, "tandem_mirror_store_records") == 0
                for x in s
            )

        wait_for(settled, 30, "mirrors and owners to drop secured updates", workers)
        before = time.time()
        scraped = {n: scrape(u) for n, u in urls.items()}
        after = time.time()
        ms = manifests(bootstrap, group)
        fleet_sum: Counter[str] = Counter()
        for s in scraped.values():
            for name in (
                "tandem_records_backed_up_total",
                "tandem_records_sequenced_total",
                "tandem_records_mirrored_total",
                "tandem_mirror_records_received_total",
                "tandem_late_records_total",
                "tandem_owned_portions",
                "tandem_mirror_store_portions",
                "tandem_unprotected_portions",
                "tandem_is_coordinator",
                "tandem_failovers_total",
            ):
                fleet_sum[name] += int(total(s, name))
        assert fleet_sum["tandem_records_backed_up_total"] == n_records
        assert fleet_sum["tandem_records_sequenced_total"] == n_records
        assert fleet_sum["tandem_records_mirrored_total"] == n_records
        assert fleet_sum["tandem_mirror_records_received_total"] == n_records
        late = sum(m.late for m in ms.values())
        assert fleet_sum["tandem_late_records_total"] == late and late >= 5
        assert fleet_sum["tandem_owned_portions"] == 4
        assert fleet_sum["tandem_mirror_store_portions"] == 4
        assert fleet_sum["tandem_unprotected_portions"] == 0
        assert fleet_sum["tandem_is_coordinator"] == 1
        assert fleet_sum["tandem_failovers_total"] == 0

        for n, s in scraped.items():
            k = int(one(s, "tandem_last_committed_set_id"))
            m = ms[k]  # the set the worker reports is committed, and its numbers match
            assert one(s, "tandem_last_committed_set_timestamp_seconds") == m.committed_ms / 1000
            assert one(s, "tandem_last_committed_window_end_seconds") == m.window_end_ms / 1000
            rpo = one(s, "tandem_rpo_seconds")
            low, high = rpo_seconds(m, int(before * 1000)), rpo_seconds(m, int(after * 1000))
            assert low is not None and high is not None
            assert low - 0.02 <= rpo <= high + 0.02, (n, rpo, low, high)
            assert one(s, "tandem_rebalances_total") >= 1
            assert one(s, "tandem_set_formation_seconds_count") == one(
                s, "tandem_set_write_seconds_count"
            )
            if one(s, "tandem_is_coordinator"):
                # It observed every manifest it wrote, each as committed minus window end.
                mine = [x for x in ms.values() if x.set_id <= k and x.coordinator == n]
                assert one(s, "tandem_set_commit_seconds_count") == len(mine) > 0
                expected = sum((x.committed_ms - x.window_end_ms) / 1000 for x in mine)
                assert one(s, "tandem_set_commit_seconds_sum") == pytest.approx(expected)
            else:
                assert one(s, "tandem_set_commit_seconds_count") == 0

        # SIGKILL a worker that is not the coordinator: the survivors take its portions over.
        the_map = control(bootstrap, group).latest_map
        assert the_map is not None
        victim = next(n for n in fleet if n != the_map.coordinator)
        victim_owned = int(one(scraped[victim], "tandem_owned_portions"))
        assert victim_owned >= 1
        fleet[victim].kill()
        survivors = {n: u for n, u in urls.items() if n != victim}

        def failed_over() -> bool:
            s = [scrape(u) for u in survivors.values()]
            return (
                sum(total(x, "tandem_failovers_total") for x in s) == victim_owned
                and sum(total(x, "tandem_owned_portions") for x in s) == 4
                and all(ready_status(u) == 200 for u in survivors.values())
            )

        wait_for(failed_over, 60, "the survivors to take over", workers)

        def restored() -> bool:
            s = [scrape(u) for u in survivors.values()]
            return sum(total(x, "tandem_unprotected_portions") for x in s) == 0 and any(
                total(x, "tandem_redundancy_restore_seconds_count") >= 1 for x in s
            )

        wait_for(restored, 30, "redundancy restored and timed", workers)
        for u in survivors.values():
            s = scrape(u)
            assert one(s, "tandem_rebalances_total") >= 2
            assert one(s, "tandem_group_members") == 2
    finally:
        for w in workers:
            w.terminate()
