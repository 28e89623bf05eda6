"""Acknowledged-ingest latency and throughput against a direct acks=all produce, in one run.

Starts an embedded broker and three workers, then, at each concurrency, runs closed-loop
clients for a fixed time: each client sends one record, waits for its answer, sends the next.

- ``kafka``: confluent-kafka, ``acks=all``, idempotent, linger 0; latency is produce() to the
  delivery report. The cluster holds the record once; nothing is backed up yet.
- ``ingest``: ``POST /v1/topics/{topic}/records`` with an Idempotency-Key, round-robin over the
  workers (so about two thirds are forwarded); latency is request to 200, which means the
  record is in the primary, numbered, and held by two workers.

    .venv/bin/python bench/ingest.py --seconds 10 --concurrency 1 16
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
from confluent_kafka import Producer

from connector.broker import EmbeddedBroker
from connector.control import read_control
from connector.fleet import WorkerProcess, write_config

TOPIC = "payments"
PARTITIONS = 6
VALUE = {"amount": 1234, "currency": "EUR", "note": "x" * 60}


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[int(q) - 1] if len(xs) > 1 else xs[0]


def direct(bootstrap: str, clients: int, seconds: float) -> tuple[list[float], float]:
    """Closed loop of ``clients`` records in flight on one acks=all producer."""
    p = Producer(
        {"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True, "linger.ms": 0}
    )
    lat: list[float] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds
    n = [0]

    def send() -> None:
        t0 = time.monotonic()
        n[0] += 1

        def done(err: Any, _msg: Any) -> None:
            assert err is None, err
            with lock:
                lat.append(time.monotonic() - t0)
            if time.monotonic() < end:
                send()

        p.produce(TOPIC, key=f"c-{n[0]}".encode(), value=str(VALUE).encode(), on_delivery=done)

    started = time.monotonic()
    for _ in range(clients):
        send()
    while time.monotonic() < end:
        p.poll(0.01)
    p.flush(30)
    return lat, time.monotonic() - started


async def ingest(urls: list[str], clients: int, seconds: float) -> tuple[list[float], float]:
    lat: list[float] = []
    failures = 0
    end = time.monotonic() + seconds
    run = f"{time.time_ns()}"

    async def client(c: int, s: aiohttp.ClientSession) -> None:
        nonlocal failures
        i = 0
        while time.monotonic() < end:
            url = urls[(c + i) % len(urls)]
            t0 = time.monotonic()
            async with s.post(
                f"{url}/v1/topics/{TOPIC}/records",
                json={"key": f"c{c}-{i}", "value": VALUE},
                headers={"Idempotency-Key": f"{run}-{c}-{i}"},
            ) as resp:
                await resp.read()
                if resp.status == 200:
                    lat.append(time.monotonic() - t0)
                else:
                    failures += 1
            i += 1

    started = time.monotonic()
    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*(client(c, s) for c in range(clients)))
    if failures:
        print(f"  ({failures} ingest requests not placed)")
    return lat, time.monotonic() - started


def endpoints(bootstrap: str, group: str, n: int) -> list[str]:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            view = asyncio.run(read_control({"bootstrap_servers": bootstrap}, f"{group}.control"))
        except Exception:
            view = None
        if view is not None and view.latest_map is not None:
            urls = [a.http_url for a in view.announcements.values() if a.http_url and a.epoch]
            if len(view.latest_map.members) == n and len(urls) == n:
                return sorted(urls)
        time.sleep(0.5)
    raise SystemExit("workers did not come up")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--workers", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker() as broker:
        from confluent_kafka.admin import AdminClient, NewTopic

        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        for f in admin.create_topics([NewTopic(TOPIC, PARTITIONS)]).values():
            f.result(15)
        config = write_config(
            Path(tmp) / "bench.yaml",
            {
                "group": "bench",
                "source": {
                    "bootstrap_servers": broker.bootstrap,
                    "topics": [TOPIC],
                    "session_timeout_ms": 6000,
                },
                "window": {"interval_s": 2, "grace_s": 0.5},
                "mirror": {"max_workers": 8},
            },
        )
        fleet = [WorkerProcess(f"w{i}", config, Path(tmp)).start() for i in range(args.workers)]
        try:
            urls = endpoints(broker.bootstrap, "bench", args.workers)
            asyncio.run(ingest(urls, 4, 2))  # warm-up: every owner has read its keys once
            print(f"{'path':8} {'clients':>7} {'records/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
            for c in args.concurrency:
                for name, (lat, took) in (
                    ("kafka", direct(broker.bootstrap, c, args.seconds)),
                    ("ingest", asyncio.run(ingest(urls, c, args.seconds))),
                ):
                    print(
                        f"{name:8} {c:>7} {len(lat) / took:>10.0f} "
                        f"{pct(lat, 50) * 1000:>8.1f} {pct(lat, 99) * 1000:>8.1f}"
                    )
        finally:
            for w in fleet:
                w.terminate()


if __name__ == "__main__":
    main()
