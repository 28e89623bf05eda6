"""The long chaos run: ``python -m bench.chaos [--events 50] [--seed N] [--workers 6]``.

The same seeded schedule of SIGKILL, restart, join and SIGTERM events as the CI test
(`tests/test_chaos.py`), longer, on its own embedded broker, then the external check. Exit
status 0 when nothing was lost, duplicated, reordered or numbered twice.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

from confluent_kafka.admin import AdminClient, NewTopic

from connector.broker import EmbeddedBroker
from connector.chaos import Chaos
from connector.fleet import write_config


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50)
    parser.add_argument("--seed", type=int, default=random.randrange(1_000_000))
    parser.add_argument("--workers", type=int, default=6, help="most workers alive at once")
    parser.add_argument("--rate", type=int, default=500, help="records per second")
    args = parser.parse_args()
    topics = {"orders": 6, "payments": 6}
    print(f"chaos seed {args.seed}: {args.events} events, up to {args.workers} workers")
    with tempfile.TemporaryDirectory(prefix="tandem-chaos-") as tmp, EmbeddedBroker() as broker:
        admin = AdminClient({"bootstrap.servers": broker.bootstrap})
        for fut in admin.create_topics([NewTopic(t, n) for t, n in topics.items()]).values():
            fut.result(15)
        config = write_config(
            Path(tmp) / "tandem.yaml",
            {
                "group": "chaos",
                "source": {
                    "bootstrap_servers": broker.bootstrap,
                    "topics": list(topics),
                    "session_timeout_ms": 6000,
                },
                "window": {"interval_s": 2, "grace_s": 0.5},
                "mirror": {"max_workers": 8},
                "announce_interval_s": 0.5,
            },
        )
        chaos = Chaos(
            bootstrap=broker.bootstrap,
            config=config,
            log_dir=Path(tmp),
            topics=list(topics),
            seed=args.seed,
            events=args.events,
            max_workers=args.workers,
            rate=args.rate,
        )
        started = time.monotonic()
        try:
            result = chaos.run()
        finally:
            chaos.stop()
        kinds = {
            k: sum(1 for e in result.events if e.kind == k)
            for k in ("kill", "restart", "join", "stop")
        }
        print(
            f"seed {result.seed}: {len(result.events)} events {kinds} in "
            f"{time.monotonic() - started:.0f} s; {result.produced} updates in {result.sets} sets"
        )
        if result.ok:
            print("verify: OK (0 lost, 0 duplicated, order kept, no sequence number reused)")
            return 0
        print(f"FAILED (replay with --seed {result.seed}):")
        for p in result.problems:
            print(f"  {p}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
