"""Worker memory with 1,000,000 records in flight: bounded by backpressure, not by luck.

The primary holds 1,000,000 records of 1 KB before the workers start, and the window is an
hour long, so no set closes during the run and every record stays "in flight" (read or
waiting on the primary, not in a committed set). Workers hold at most
``source.max_unsecured_records`` as owners and ``mirror.memory_records`` copies in memory
as mirrors; the rest waits on the primary. RSS is sampled from /proc via psutil, the held
counts from each worker's /metrics.
"""

from __future__ import annotations

import re
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import create_topics, manifests, prefill, rss_bytes, stop_fleet, worker_config
from bench.probe import free_port
from connector.broker import EmbeddedBroker
from connector.fleet import WorkerProcess

TOPIC = "mem-primary"
PARTITIONS = 12
GAUGES = ("tandem_in_flight_records", "tandem_mirror_store_records")


def scrape(port: int) -> dict[str, float]:
    """Sum of each gauge over its series; empty if the worker does not answer yet."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = dict.fromkeys(GAUGES, 0.0)
    for line in text.splitlines():
        m = re.match(r"^(\w+)(?:\{[^}]*\})? (\S+)$", line)
        if m and m[1] in out:
            out[m[1]] += float(m[2])
    return out


def measure(work: Path, records: int, seconds: float) -> dict[str, Any]:
    with EmbeddedBroker() as broker:
        bs = broker.bootstrap
        create_topics(bs, {TOPIC: PARTITIONS})
        prefill(bs, TOPIC, PARTITIONS, records, 1024)
        config = worker_config(work, bs, "mem", [TOPIC], window={"interval_s": 3600, "grace_s": 1})
        ports = {f"m{i}": free_port() for i in range(3)}
        fleet = [
            WorkerProcess(n, config, work, env={"TANDEM_HTTP__LISTEN": f"127.0.0.1:{p}"}).start()
            for n, p in ports.items()
        ]
        samples: list[dict[str, Any]] = []
        t0 = time.time()
        try:
            while time.time() - t0 < seconds:
                time.sleep(1.0)
                s: dict[str, Any] = {"t": round(time.time() - t0, 1)}
                for w in fleet:
                    assert w.proc is not None and w.alive, w.log_tail()
                    s[w.name] = {"rss": rss_bytes(w.proc.pid), **scrape(ports[w.name])}
                samples.append(s)
        finally:
            stop_fleet(fleet)
        committed = len(manifests(bs, "mem"))
    names = list(ports)
    peak = {n: max(s[n]["rss"] for s in samples) for n in names}
    last = samples[-1]
    return {
        "records": records,
        "record_bytes": 1024,
        "committed_sets": committed,
        "max_unsecured_records": 100_000,
        "memory_records": 100_000,
        "peak_rss_bytes": peak,
        "max_peak_rss_bytes": max(peak.values()),
        "owner_held_end": sum(last[n].get("tandem_in_flight_records", 0) for n in names),
        "mirror_held_end": sum(last[n].get("tandem_mirror_store_records", 0) for n in names),
        "samples": samples,
    }
