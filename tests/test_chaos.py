"""Chaos: a seeded random schedule of SIGKILL, restart, join and SIGTERM under steady load.

Replay a failing run with ``TANDEM_CHAOS_SEED=<seed> pytest tests/test_chaos.py``; the seed
is in the failure message. ``python -m bench.chaos`` runs the long version (50+ events).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from connector.chaos import Chaos
from tests.support import worker_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]


def test_twenty_random_membership_events_lose_and_duplicate_nothing(
    bootstrap: str, unique: str, make_topics, tmp_path: Path
) -> None:
    seed = int(os.environ.get("TANDEM_CHAOS_SEED", random.randrange(1_000_000)))
    group = f"c-{unique}"
    topics = [f"a-{unique}", f"b-{unique}"]
    make_topics(bootstrap, dict.fromkeys(topics, 4))
    config = worker_config(tmp_path, bootstrap, group, topics)
    chaos = Chaos(
        bootstrap=bootstrap,
        config=config,
        log_dir=tmp_path,
        topics=topics,
        seed=seed,
        events=20,
        pause_s=(2.5, 5.0),
    )
    print(f"chaos seed {seed}")
    try:
        result = chaos.run(settle_timeout_s=180)
    finally:
        chaos.stop()
    kinds = sorted({e.kind for e in result.events})
    assert result.ok, f"seed {seed}: {result.problems}\nevents: {result.events}"
    assert len(result.events) == 20 and len(kinds) >= 3, f"seed {seed}: {kinds}"
    assert result.verified is not None and result.verified.records_checked == result.produced
    print(
        f"seed {seed}: {len(result.events)} events {kinds}, {result.produced} updates, "
        f"{result.sets} sets, verify ok"
    )
