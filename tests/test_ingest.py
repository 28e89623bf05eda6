"""Protocol step 7 from outside: posted records, forwarded or not, through crashes.

The end-to-end test trusts no worker's account: it reads the primary topic and the manifests
itself and checks every acknowledged record is there once, where the answer said, and in a
committed set.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from confluent_kafka import Producer

from connector.config import load_settings
from connector.fleet import WorkerProcess
from connector.http import build_app
from connector.ingest_request import MAX_BODY_BYTES, default_partition
from connector.messages import MapMember, MapPortion, PortionMap, header
from connector.owner import INGEST_HEADER
from connector.worker import Worker
from tests.support import control, manifests, read_all, run_verify, wait_for, worker_config


def test_partitioner_is_kafkas_murmur2(bootstrap: str, unique: str, make_topics) -> None:
    """Same portion as a Kafka producer with the default partitioner would choose."""
    topic = f"m-{unique}"
    make_topics(bootstrap, {topic: 7})
    keys = [f"key-{i}".encode() for i in range(40)] + [b"", b"a", b"ab", b"abc", "ü".encode()]
    got: dict[bytes, int] = {}
    p = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2"})
    for k in keys:
        p.produce(
            topic,
            key=k,
            value=b"x",
            on_delivery=lambda e, m: got.__setitem__(m.key(), m.partition()),
        )
    assert p.flush(30) == 0
    assert {k: default_partition(k, 7) for k in keys} == got


# -- malformed requests, in-process ---------------------------------------------------------


@pytest.fixture
async def client(bootstrap: str) -> AsyncIterator[TestClient[Any, Any]]:
    w = Worker(
        load_settings(
            None,
            group="ingest-test",
            member_id="w0",
            source={"bootstrap_servers": bootstrap, "topics": ["orders"]},
        )
    )
    w.map = PortionMap(
        epoch=1,
        coordinator="w0",
        members=[MapMember(name="w0", slot=0, kafka_member_id="k0")],
        portions=[MapPortion(topic="orders", partition=i, owner="w0") for i in range(3)],
    )
    w.metrics.rebalance_started()  # a map but no owner to ask: every valid request gets 503
    async with TestClient(TestServer(build_app(w, None))) as c:
        yield c
    await w.close()


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("orders/records", b'{"value": ', 400, "malformed JSON"),
        ("orders/records", b"[1]", 400, "the record must be a JSON object"),
        ("orders/records", b'{"valeu": 1}', 400, "unknown field(s) valeu"),
        ("orders/records", b'{"value": {"type": "BINARY", "data": "%%"}}', 400, "not base64"),
        ("orders/records", b'{"key": {"type": "AVRO", "data": 1}}', 400, "type must be"),
        ("orders/records", b'{"headers": [{"name": "tandem.seq"}]}', 400, "reserved"),
        ("orders/records", b'{"partition_id": 3}', 404, "partition 3 of topic orders"),
        ("nope/records", b'{"value": 1}', 404, "topic nope is not a primary topic"),
        ("orders/records:batch", b'{"entries": [{"value": 1}]}', 400, "entry 0: needs an id"),
        ("orders/records:batch", b'{"entries": [{"id": "a", "x": 1}]}', 400, "entry a: unknown"),
        ("orders/records", b'{"value": "' + b"x" * MAX_BODY_BYTES + b'"}', 413, "larger than"),
        ("orders/records", b'{"value": {"amount": 5}}', 503, "rebalancing"),
    ],
)
async def test_refusals_name_the_problem(
    client: TestClient[Any, Any], path: str, body: bytes, status: int, message: str
) -> None:
    resp = await client.post(f"/v1/topics/{path}", data=body)
    answer = await resp.json()
    assert (resp.status, answer["error_code"]) == (status, status)
    assert message in answer["message"]
    assert ("Retry-After" in resp.headers) == (status == 503)


async def test_a_bad_idempotency_key_is_refused(client: TestClient[Any, Any]) -> None:
    resp = await client.post(
        "/v1/topics/orders/records", data=b"{}", headers={"Idempotency-Key": "has space"}
    )
    assert resp.status == 400 and "Idempotency-Key" in (await resp.json())["message"]


# -- real workers ---------------------------------------------------------------------------


async def post(
    s: aiohttp.ClientSession, url: str, topic: str, body: dict[str, Any], key: str
) -> tuple[int, dict[str, Any]]:
    async with s.post(
        f"{url}/v1/topics/{topic}/records", json=body, headers={"Idempotency-Key": key}
    ) as resp:
        return resp.status, await resp.json()


RETRIED: Counter[str] = Counter()


async def until_placed(
    s: aiohttp.ClientSession, urls: list[str], topic: str, body: dict[str, Any], key: str
) -> dict[str, Any]:
    """What a careful client does: retry with the same key, elsewhere, until it is placed."""
    deadline = time.monotonic() + 60
    errors: list[str] = []
    for attempt in range(1000):
        if time.monotonic() > deadline:
            break
        url = urls[attempt % len(urls)]
        try:
            status, answer = await post(s, url, topic, body, key)
        except aiohttp.ClientError as exc:
            errors.append(repr(exc))
            await asyncio.sleep(0.2)
            continue
        if status == 200:
            RETRIED[key] = len(errors)
            return answer
        assert status == 503, answer
        errors.append(answer["message"])
        await asyncio.sleep(0.5)
    raise AssertionError(f"{key} never placed: {errors[-5:]}")


def record(i: int) -> dict[str, Any]:
    return {
        "key": f"customer-{i}",
        "value": {"amount": i},
        "headers": [{"name": "trace", "value": base64.b64encode(f"t{i}".encode()).decode()}],
    }


@pytest.mark.slow
def test_every_acknowledged_record_is_in_the_primary_once_and_in_a_committed_set(
    bootstrap: str, unique: str, make_topics, tmp_path: Path
) -> None:
    group = f"i-{unique}"
    topic = f"pay-{unique}"
    make_topics(bootstrap, {topic: 4})
    config = worker_config(tmp_path, bootstrap, group, [topic])
    fleet = {f"w{i}": WorkerProcess(f"w{i}", config, tmp_path).start() for i in range(3)}
    acked: dict[str, dict[str, Any]] = {}
    try:

        def urls() -> dict[str, str]:
            view = control(bootstrap, group)
            m = view.latest_map
            if m is None or {x.name for x in m.members} != set(fleet):
                return {}
            return {n: a.http_url for n, a in view.announcements.items() if a.http_url}

        wait_for(lambda: len(urls()) == 3, 60, "three workers with endpoints", list(fleet.values()))
        wait_for(lambda: len(manifests(bootstrap, group)) >= 1, 60, "a set", list(fleet.values()))
        where = urls()
        m = control(bootstrap, group).latest_map
        assert m is not None
        owner = {p.partition: p.owner for p in m.portions}

        async def steady() -> None:
            async with aiohttp.ClientSession() as s:
                # Concurrent clients, each record to a worker chosen without regard to owners.
                names = sorted(where)
                answers = await asyncio.gather(
                    *(
                        until_placed(s, [where[names[i % 3]]], topic, record(i), f"k{i}")
                        for i in range(60)
                    )
                )
                acked.update({f"k{i}": a for i, a in enumerate(answers)})
                forwarded = sum(
                    owner[a["partition_id"]] != names[i % 3] for i, a in enumerate(answers)
                )
                assert 0 < forwarded < 60  # both paths taken
                # A retry with the same key, to another worker, gets the same answer.
                for i in range(0, 60, 7):
                    status, again = await post(
                        s, where[names[(i + 1) % 3]], topic, record(i), f"k{i}"
                    )
                    assert status == 200 and again == acked[f"k{i}"]
                # The batch form, and its retry.
                batch = {"entries": [{"id": str(i), **record(100 + i)} for i in range(5)]}
                for _ in range(2):
                    async with s.post(
                        f"{where[names[0]]}/v1/topics/{topic}/records:batch",
                        json=batch,
                        headers={"Idempotency-Key": "b"},
                    ) as resp:
                        assert resp.status == 207
                        answer = await resp.json()
                    assert answer["failures"] == [] and len(answer["successes"]) == 5
                    for a in answer["successes"]:
                        assert acked.setdefault(f"b/{a.pop('id')}", a) == a

        asyncio.run(steady())

        # SIGKILL the owner of some portions and a forwarder while requests to those portions
        # are in flight through every worker.
        survivor = m.coordinator
        victim, forwarder = sorted(set(fleet) - {survivor})
        theirs = {p for p, o in owner.items() if o == victim}
        keys = [
            f"x{i}"
            for i in range(400)
            if default_partition(f'"customer-x{i}"'.encode(), 4) in theirs
        ][:30]

        async def crash() -> None:
            async with aiohttp.ClientSession() as s:
                order = [where[victim], where[forwarder], where[survivor]]
                tasks = [
                    asyncio.create_task(
                        until_placed(
                            s,
                            [*order[n % 3 :], where[survivor]],
                            topic,
                            {"key": f"customer-{k}", "value": {"crash": k}},
                            k,
                        )
                    )
                    for n, k in enumerate(keys)
                ]
                await asyncio.sleep(0.05)
                fleet[victim].kill()
                fleet[forwarder].kill()
                answers = await asyncio.gather(*tasks)
                acked.update(dict(zip(keys, answers, strict=True)))

        t0 = time.monotonic()
        asyncio.run(crash())
        retried = [k for k in keys if RETRIED[k]]
        print(
            f"{len(keys)} requests through a crash: {len(retried)} retried, all placed "
            f"{time.monotonic() - t0:.1f} s after the kill"
        )
        assert retried, "no request was in flight when the workers died"
        alive = [fleet[survivor]]

        # Every acknowledged record: in the primary once, where its answer says, and in a
        # committed set.
        def in_sets() -> bool:
            ms = manifests(bootstrap, group)
            last = ms[max(ms)] if ms else None
            have = {p.partition: p.last_seq for p in last.portions} if last else {}
            return all(
                have.get(a["partition_id"], -1) >= a["sequence_number"] for a in acked.values()
            )

        wait_for(in_sets, 60, "committed sets holding every acknowledged record", alive)
        primary = asyncio.run(read_all(bootstrap, topic, 4))
        found: Counter[str] = Counter()
        places: dict[str, tuple[int, int]] = {}
        for partition, records in primary.items():
            for r in records:
                k = header(list(r.headers), INGEST_HEADER)
                if k is not None:
                    found[k.decode()] += 1
                    places[k.decode()] = (partition, r.offset)
        assert {k for k, n in found.items() if n > 1} == set()
        for k, a in acked.items():
            assert places.get(k) == (a["partition_id"], a["offset"]), k
        assert len(acked) == 60 + 5 + len(keys)
        sample = next(
            r for r in primary[acked["k3"]["partition_id"]] if r.offset == acked["k3"]["offset"]
        )
        assert (sample.key, json.loads(sample.value)) == (b'"customer-3"', {"amount": 3})
        result = run_verify(config)
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        for w in fleet.values():
            w.terminate()
