"""Protocol steps 5 and 6 from outside: joins and graceful stops at set boundaries, failover.

Each test reads the primary, the mirror topic, the control topic and the manifests itself
(`connector.timeline`, `tandem verify`) and trusts no worker's account of what it did.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from connector.coordinator import plan_handover
from connector.fleet import SteadyProducer, WorkerProcess
from connector.timeline import Timeline, read_timeline
from tests.support import control, covered, manifests, run_verify, wait_for, worker_config

pytestmark = pytest.mark.slow

SLOTS = 8


def timeline(bootstrap: str, group: str) -> Timeline:
    return asyncio.run(read_timeline({"bootstrap_servers": bootstrap}, group, SLOTS))


def members(bootstrap: str, group: str) -> set[str]:
    m = control(bootstrap, group).latest_map
    return {mm.name for mm in m.members} if m else set()


def finish(bootstrap: str, group: str, producer: SteadyProducer, fleet, config: Path) -> None:
    """Stop producing, wait until committed sets hold every update, and verify."""
    counts = producer.stop()
    assert producer.failed == 0
    wait_for(lambda: covered(bootstrap, group, counts), 90, "sets covering every update", fleet)
    result = run_verify(config)
    assert result.returncode == 0, result.stdout + result.stderr


def start(
    bootstrap: str, group: str, topics: dict[str, int], make_topics, tmp_path: Path, workers: int
) -> tuple[Path, list[WorkerProcess], SteadyProducer]:
    """Topics, ``workers`` worker processes and steady producers, all started."""
    make_topics(bootstrap, topics)
    config = worker_config(tmp_path, bootstrap, group, list(topics))
    fleet = [WorkerProcess(f"w{i}", config, tmp_path).start() for i in range(workers)]
    producer = SteadyProducer(bootstrap, list(topics), rate=400).start()
    return config, fleet, producer


def test_join_and_graceful_stop_move_portions_only_at_set_boundaries(
    bootstrap: str, unique: str, make_topics, tmp_path: Path
) -> None:
    group = f"j-{unique}"
    topics = {f"a-{unique}": 4, f"b-{unique}": 4}
    config, fleet, producer = start(bootstrap, group, topics, make_topics, tmp_path, 2)
    try:
        wait_for(lambda: members(bootstrap, group) == {"w0", "w1"}, 60, "two members", fleet)
        wait_for(lambda: len(manifests(bootstrap, group)) >= 3, 60, "sets committing", fleet)
        joined_ms = int(time.time() * 1000)
        fleet.append(WorkerProcess("w2", config, tmp_path).start())
        wait_for(lambda: members(bootstrap, group) == {"w0", "w1", "w2"}, 60, "the join", fleet)
        wait_for(lambda: len(manifests(bootstrap, group)) >= 3, 60, "sets", fleet)
        time.sleep(3)  # steady state under the new map before the next change
        left_ms = int(time.time() * 1000)
        assert fleet[0].terminate(timeout_s=40) == 0, fleet[0].log_tail()
        stopped_s = (time.time() * 1000 - left_ms) / 1000
        wait_for(lambda: members(bootstrap, group) == {"w1", "w2"}, 60, "w0 gone", fleet)
        time.sleep(3)
        finish(bootstrap, group, producer, fleet, config)

        t = timeline(bootstrap, group)
        assert not t.reused
        moved = 0
        for event, since, who in (
            ("join", joined_ms, {"w0", "w1", "w2"}),
            ("graceful stop", left_ms, {"w1", "w2"}),
        ):
            at, after = t.first_map_after(since, who)
            before = t.map_at(since)
            assert before is not None
            pauses: dict[bool, float] = {True: 0.0, False: 0.0}
            for p in after.portions:
                old = before.portion(p.topic, p.partition)
                assert old is not None
                portion = (p.topic, p.partition)
                gap = t.gaps(portion, since, at + 5000)
                pauses[old.owner != p.owner] = max(pauses[old.owner != p.owner], gap)
                if old.owner == p.owner:
                    continue
                moved += 1
                # No update of the set in formation was numbered by two owners: the old owner
                # stopped at a cut, the new one started exactly there.
                twice = {s: o for s, o in t.owners_of_seqs(portion).items() if len(o) > 1}
                assert not twice, f"{portion}: numbered by two owners: {sorted(twice)[:5]}"
            print(
                f"{event}: longest pause {pauses[False]:.1f} s for portions that stayed, "
                f"{pauses[True]:.1f} s for portions that moved"
            )
        assert moved >= 2
        lags = sorted(
            (m.committed_ms - m.window_end_ms) / 1000 for m in manifests(bootstrap, group).values()
        )
        print(
            f"graceful stop took {stopped_s:.1f} s; set commit lag after the window end: "
            f"median {lags[len(lags) // 2]:.1f} s, max {lags[-1]:.1f} s"
        )
    finally:
        producer.stop()
        for w in fleet:
            w.terminate()


def test_sigkill_fails_over_to_mirrors_or_to_whom_a_mirror_passes_copies(
    bootstrap: str, unique: str, make_topics, tmp_path: Path
) -> None:
    """Each orphaned portion goes to its mirror, or, where balance puts it elsewhere, to a
    worker the surviving mirror passes its copies to; redundancy comes back."""
    group = f"k-{unique}"
    # Six portions over four workers (2/2/1/1): a dead owner of two leaves its mirrors 3/2/1,
    # and balance moves one portion on, past its mirror.
    config, fleet, producer = start(bootstrap, group, {f"t-{unique}": 6}, make_topics, tmp_path, 4)
    try:
        names = {w.name for w in fleet}
        wait_for(lambda: members(bootstrap, group) == names, 60, "a map of four", fleet)
        wait_for(lambda: len(manifests(bootstrap, group)) >= 2, 60, "sets committing", fleet)
        m = control(bootstrap, group).latest_map
        assert m is not None
        # The assignor is deterministic: pick a victim one of whose portions will go to a
        # worker other than its mirror (balance beats stickiness there).
        victim = ""
        for name in sorted(names - {m.coordinator}):
            for mv in plan_handover(m, [], [name], max_slots=SLOTS):
                e = m.portion(mv.topic, mv.partition)
                if mv.from_member == name and e is not None and mv.to_member != e.mirror:
                    victim = name
        assert victim, f"no victim moves a portion past its mirror in {m}"
        killed_ms = int(time.time() * 1000)
        next(w for w in fleet if w.name == victim).kill()
        rest = names - {victim}
        wait_for(lambda: members(bootstrap, group) == rest, 60, "failover", fleet)
        time.sleep(4)
        finish(bootstrap, group, producer, fleet, config)

        t = timeline(bootstrap, group)
        assert not t.reused
        at, after = t.first_map_after(killed_ms, rest)
        orphans = [p for p in m.portions if p.owner == victim]
        passed_on = 0
        for p in orphans:
            now = after.portion(p.topic, p.partition)
            assert now is not None
            if now.owner != p.mirror:
                # The surviving mirror's copies travelled to the new owner, closed by a marker.
                assert any(
                    h_at > killed_ms and hp == (p.topic, p.partition) and to == now.owner
                    for h_at, hp, to, _ in t.handoffs
                ), (p, now, t.handoffs)
                passed_on += 1
        assert passed_on >= 1
        resumed = [t.resumed((p.topic, p.partition), killed_ms) for p in orphans]
        assert all(resumed), "an orphaned portion never moved again"
        failover_s = max(r.at_ms for r in resumed if r) / 1000 - killed_ms / 1000
        protected = t.protected_at(at)
        assert protected is not None, "redundancy was never restored"
        print(
            f"failover of {len(orphans)} portions ({passed_on} via a passed-on copy set) "
            f"{failover_s:.1f} s (map after {(at - killed_ms) / 1000:.1f} s), "
            f"redundancy restored {(protected - killed_ms) / 1000:.1f} s after the kill"
        )
        assert failover_s < 30
    finally:
        producer.stop()
        for w in fleet:
            w.terminate()
