"""Throughput: Tandem (3 workers) against the raw relay, same records, same broker.

The primary topic is filled before anything starts; each competitor is timed until
everything is copied: the relay until its last write is acknowledged, Tandem until a
committed manifest covers every record. The relay runs before and after Tandem and the
ratio uses their mean, so a neighbour's load on the shared cores hits both sides.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    covered,
    cpu_seconds,
    create_topics,
    manifests,
    map_times,
    prefill,
    stop_fleet,
    wait_for,
    worker_config,
)
from connector.broker import EmbeddedBroker
from connector.config import load_settings
from connector.fleet import WorkerProcess
from connector.verify import verify

TOPIC = "bench-primary"
PARTITIONS = 12
WORKERS = 3


def run_relay(bootstrap: str, dst: str, count: int) -> dict[str, Any]:
    create_topics(bootstrap, {dst: PARTITIONS})
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.relay",
            "--bootstrap",
            bootstrap,
            "--src",
            TOPIC,
            "--dst",
            dst,
            "--partitions",
            str(PARTITIONS),
            "--count",
            str(count),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    r: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    r["total_s"] = r["done"] - r["started"]
    r["rate"] = count / r["total_s"]
    r["per_core"] = count / r["cpu_s"]
    return r


def run_tandem(bootstrap: str, work: Path, count: int, counts: Any, check: bool) -> dict[str, Any]:
    group = "tput"
    config = worker_config(
        work, bootstrap, group, [TOPIC], window={"interval_s": 1, "grace_s": 0.5}
    )
    started = time.time()
    fleet = [WorkerProcess(f"t{i}", config, work).start() for i in range(WORKERS)]
    try:
        done = wait_for(
            lambda: covered(max(manifests(bootstrap, group).items(), default=(0, None))[1], counts),
            600,
            "sets covering every record",
            fleet,
        )
        cpu = sum(cpu_seconds(w.proc.pid if w.proc else None) for w in fleet)
    finally:
        stop_fleet(fleet)
    maps = map_times(bootstrap, group)
    mapped = maps[0][0] / 1000 if maps else started
    sets = manifests(bootstrap, group)
    r: dict[str, Any] = {
        "records": count,
        "total_s": done - started,
        "from_map_s": done - mapped,
        "cpu_s": cpu,
        "sets": len(sets),
    }
    r["rate"] = count / r["total_s"]
    r["rate_from_map"] = count / r["from_map_s"]
    r["per_core"] = count / cpu
    if check:
        result = asyncio.run(verify(load_settings(config), all_sets=True, timeout_s=300))
        r["verified"] = bool(result.ok)
    return r


def measure(work: Path, count: int, size: int = 1024, check: bool = True) -> dict[str, Any]:
    with EmbeddedBroker() as broker:
        bs = broker.bootstrap
        create_topics(bs, {TOPIC: PARTITIONS})
        t0 = time.monotonic()
        counts = prefill(bs, TOPIC, PARTITIONS, count, size)
        fill_s = time.monotonic() - t0
        relay_a = run_relay(bs, "relay-a", count)
        tandem = run_tandem(bs, work, count, counts, check)
        relay_b = run_relay(bs, "relay-b", count)
    relay_rate = (relay_a["rate"] + relay_b["rate"]) / 2
    relay_core = (relay_a["per_core"] + relay_b["per_core"]) / 2
    return {
        "records": count,
        "record_bytes": size,
        "partitions": PARTITIONS,
        "workers": WORKERS,
        "prefill_s": fill_s,
        "relay": [relay_a, relay_b],
        "tandem": tandem,
        "ratio": tandem["rate"] / relay_rate,
        "ratio_from_map": tandem["rate_from_map"] / relay_rate,
        "per_core_ratio": tandem["per_core"] / relay_core,
    }
