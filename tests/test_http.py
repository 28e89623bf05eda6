"""The HTTP endpoints of one worker, in-process: probe status codes, token, binding."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from connector.config import Settings, load_settings
from connector.errors import ConfigError
from connector.http import build_app
from connector.messages import MapMember, MapPortion, PortionMap
from connector.worker import Worker

TOKEN = "t0ken-Zq9-not-in-logs"


def settings(bootstrap: str, **http: Any) -> Settings:
    return load_settings(
        None,
        group="http-test",
        member_id="w0",
        source={"bootstrap_servers": bootstrap, "topics": ["unused"]},
        http=http or {"listen": "127.0.0.1:0"},
    )


def a_map(*members: str, epoch: int = 4) -> PortionMap:
    return PortionMap(
        epoch=epoch,
        coordinator=members[0],
        first_window=1,
        members=[
            MapMember(name=m, slot=i, kafka_member_id=f"k-{m}") for i, m in enumerate(members)
        ],
        portions=[MapPortion(topic="unused", partition=0, owner=members[0], mirror=None)],
    )


@pytest.fixture
async def worker(bootstrap: str) -> AsyncIterator[Worker]:
    w = Worker(settings(bootstrap))
    yield w
    await w.close()


@pytest.fixture
async def client(worker: Worker) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(build_app(worker, TOKEN))) as c:
        yield c


async def ready(client: TestClient[Any, Any]) -> tuple[int, dict[str, Any]]:
    resp = await client.get("/readyz")
    return resp.status, await resp.json()


async def test_readyz_follows_the_worker_through_its_states(
    worker: Worker, client: TestClient[Any, Any]
) -> None:
    status, body = await ready(client)
    assert (status, body["ready"]) == (503, False)
    assert body["reason"].startswith("starting")

    worker.map = a_map("w1", "w2")  # a map this worker is not in (its id is taken, say)
    status, body = await ready(client)
    assert status == 503 and body["reason"] == "not in the map of epoch 4"

    worker.map = a_map("w0", "w1")
    status, body = await ready(client)
    assert (status, body["ready"]) == (200, True)
    assert body["reason"] == "member of epoch 4 with 0 portions"

    worker.metrics.rebalance_started()  # revoked: a new map is coming
    status, body = await ready(client)
    assert status == 503 and body["reason"].startswith("rebalancing")
    worker.metrics.rebalance_finished()
    assert (await ready(client))[0] == 200


async def test_healthz_and_metrics_need_no_token(client: TestClient[Any, Any]) -> None:
    resp = await client.get("/healthz")
    assert resp.status == 200 and await resp.json() == {"status": "alive"}
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain; version=")
    text = await resp.text()
    assert 'tandem_worker_info{group="http-test",member="w0"} 1.0' in text
    assert "tandem_slot -1.0" in text
    assert "tandem_rpo_seconds" not in text  # no set committed yet: no made-up RPO


@pytest.mark.parametrize(
    ("authorization", "status"),
    [(None, 401), ("Bearer wrong", 401), (TOKEN, 401), (f"Bearer {TOKEN}", 503)],
)
async def test_admin_routes_need_the_bearer_token(
    client: TestClient[Any, Any], authorization: str | None, status: int
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    resp = await client.get("/v1/admin/status", headers=headers)
    assert resp.status == status  # 503 with the token: the worker is not started
    if status == 401:
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")


async def test_ingest_routes_are_guarded_too(client: TestClient[Any, Any]) -> None:
    """The ingest routes are added to the same app, so the token guards them by default."""
    for path in ("/v1/topics/orders/records", "/v1/topics/orders/records:batch"):
        assert (await client.post(path, data=b"{}")).status == 401
        resp = await client.post(path, data=b"{", headers={"Authorization": f"Bearer {TOKEN}"})
        assert resp.status == 400  # past the guard: the ingest route itself answers
        assert (await resp.json())["message"].startswith("malformed JSON")


async def test_without_a_token_admin_routes_are_open(worker: Worker) -> None:
    async with TestClient(TestServer(build_app(worker, None))) as c:
        assert (await c.get("/v1/admin/status")).status == 503


async def test_server_binds_loopback_by_default_and_can_be_disabled(bootstrap: str) -> None:
    w = Worker(settings(bootstrap))
    try:
        await w.http.start()
        assert w.http.url is not None and w.http.url.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as s, s.get(f"{w.http.url}/healthz") as resp:
            assert resp.status == 200
    finally:
        await w.close()
    assert w.http.url is not None
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as s, s.get(f"{w.http.url}/healthz"):
            pass

    off = Worker(settings(bootstrap, listen=None))
    await off.http.start()
    assert off.http.url is None
    await off.close()


def test_listen_and_token_config(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("TANDEM_"):
            monkeypatch.delenv(name)
    base = {"source": {"bootstrap_servers": "k:9092", "topics": ["t"]}}
    s = load_settings(None, **base, http={"listen": "0.0.0.0:8080", "token": TOKEN})
    assert s.http.address == ("0.0.0.0", 8080)
    assert TOKEN not in repr(s) and TOKEN not in str(s.model_dump())
    assert load_settings(None, **base, http={"listen": "[::1]:9000"}).http.address == ("::1", 9000)
    monkeypatch.setenv("TANDEM_HTTP__TOKEN", "from-env")
    token = load_settings(None, **base).http.token
    assert token is not None and token.get_secret_value() == "from-env"
    for bad in ("8080", "host:", ":80", "h:99999", "h:http"):
        with pytest.raises(ConfigError) as info:
            load_settings(None, **base, http={"listen": bad})
        assert f"http: listen {bad!r} must be host:port" in str(info.value)
