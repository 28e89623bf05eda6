"""Issue 10 from outside: broker stalls, topology changes while running, hostile input.

Every case ends with the same check as the chaos test: committed sets cover every
acknowledged update, ``tandem verify`` compares primary and backup byte for byte, and the
mirror topic shows no sequence number given to two records.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from connector.broker import EmbeddedBroker
from connector.fleet import SteadyProducer, WorkerProcess
from connector.timeline import read_timeline
from tests.conftest import create_topics
from tests.support import covered, manifests, run_verify, wait_for, worker_config
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
