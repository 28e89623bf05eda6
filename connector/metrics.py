"""Prometheus metrics of one worker.

State (RPO, last set, in-flight updates, mirror store, map) is read from the worker when
Prometheus scrapes, by a collector, so the read loop never updates a gauge per record and a
scrape always shows the state as it is. Events that leave no trace in the state (sets
written, rebalances, failovers, durations) are counters and histograms that the worker
bumps where they happen. Each worker has its own registry: two workers in one process
(tests) never mix their numbers, and nothing lands in the global default registry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from connector.messages import Manifest, SetReport
from connector.status import rpo_seconds, unprotected

if TYPE_CHECKING:
    from connector.worker import Worker

PORTION = ("topic", "partition")
SET_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120, 300)
REBALANCE_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


class Metrics:
    """The worker's registry and its event metrics; ``render()`` is what /metrics serves."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self.registry = CollectorRegistry()
        r = self.registry
        self.records_backed_up = Counter(
            "tandem_records_backed_up",
            "Updates this worker wrote to backup topics in committed set transactions",
            PORTION,
            registry=r,
        )
        self.late_records = Counter(
            "tandem_late_records",
            "Updates that arrived after their window was sealed and went into a later set",
            PORTION,
            registry=r,
        )
        self.set_formation = Histogram(
            "tandem_set_formation_seconds",
            "From a set's window end to this owner's part of it committed in its transaction",
            buckets=SET_BUCKETS,
            registry=r,
        )
        self.set_write = Histogram(
            "tandem_set_write_seconds",
            "Duration of one owner's set transaction (records, report, commit)",
            buckets=SET_BUCKETS,
            registry=r,
        )
        self.set_commit = Histogram(
            "tandem_set_commit_seconds",
            "From a set's window end to its manifest committed; observed by its coordinator",
            buckets=SET_BUCKETS,
            registry=r,
        )
        self.rebalances = Counter(
            "tandem_rebalances", "Rebalances this worker completed (new maps applied)", registry=r
        )
        self.rebalance_duration = Histogram(
            "tandem_rebalance_seconds",
            "From revocation to the new map applied, takeovers included",
            buckets=REBALANCE_BUCKETS,
            registry=r,
        )
        self.failovers = Counter(
            "tandem_failovers",
            "Portions this worker took over from an owner that had left the group",
            registry=r,
        )
        self.redundancy_restore = Histogram(
            "tandem_redundancy_restore_seconds",
            "From the start of a rebalance that degraded redundancy (failover or a mirror "
            "change) until every update this worker owns is held by two workers again",
            buckets=REBALANCE_BUCKETS,
            registry=r,
        )
        r.register(_StateCollector(worker))
        self.rebalancing = False
        self._rebalance_t0: float | None = None
        self._mirrors_before: dict[tuple[str, int], str | None] = {}
        self._failed_over = 0
        self._restore: asyncio.Task[None] | None = None

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- event sites -----------------------------------------------------------------------

    def set_written(self, report: SetReport, write_s: float) -> None:
        """The owner's transaction for a set committed: its records are in the backup."""
        for p in report.portions:
            labels = (p.topic, str(p.partition))
            self.records_backed_up.labels(*labels).inc(p.count)
            self.late_records.labels(*labels).inc(p.late)
        self.set_write.observe(write_s)
        self.set_formation.observe(max(0.0, time.time() - report.window_end_ms / 1000))

    def manifest_seen(self, m: Manifest) -> None:
        """Only the coordinator that wrote a manifest observes it, so the fleet counts it once."""
        if m.coordinator == self._worker.name:
            self.set_commit.observe(max(0.0, (m.committed_ms - m.window_end_ms) / 1000))

    def failed_over(self, portions: int) -> None:
        self.failovers.inc(portions)
        self._failed_over += portions

    def rebalance_started(self) -> None:
        """Called on revocation: the worker is not ready until the new map is applied."""
        self.rebalancing = True
        if self._rebalance_t0 is None:
            self._rebalance_t0 = time.monotonic()
            self._mirrors_before = {p: st.mirror for p, st in self._worker.portions.items()}
            self._failed_over = 0

    def rebalance_finished(self) -> None:
        """Called once the new map is applied and takeovers are done."""
        t0 = self._rebalance_t0 if self._rebalance_t0 is not None else time.monotonic()
        self.rebalances.inc()
        self.rebalance_duration.observe(time.monotonic() - t0)
        self.rebalancing = False
        self._rebalance_t0 = None
        changed = any(
            p in self._mirrors_before and self._mirrors_before[p] != st.mirror
            for p, st in self._worker.portions.items()
        )
        if (self._failed_over or changed) and self._worker.sender is not None:
            if self._restore is not None:
                self._restore.cancel()
            self._restore = asyncio.create_task(self._time_restore(t0), name="redundancy-metric")

    async def _time_restore(self, t0: float) -> None:
        """Redundancy is back once re-mirrored updates are acknowledged, if all have a mirror."""
        assert self._worker.sender is not None
        await self._worker.sender.drain()
        if all(st.mirror is not None for st in self._worker.portions.values()):
            self.redundancy_restore.observe(time.monotonic() - t0)

    def close(self) -> None:
        if self._restore is not None:
            self._restore.cancel()


class _StateCollector(Collector):
    """Gauges and counters derived from the worker's state at scrape time."""

    def __init__(self, worker: Worker) -> None:
        self._w = worker

    def collect(self) -> Iterator[Metric]:
        w = self._w
        info = GaugeMetricFamily(
            "tandem_worker_info", "This worker's identity (value 1)", labels=["member", "group"]
        )
        info.add_metric([w.name, w.settings.group], 1)
        yield info
        yield from self._map()
        yield from self._sets()
        yield from self._owned()
        yield from self._mirrored()

    def _map(self) -> Iterator[Metric]:
        w = self._w
        m = w.map
        yield GaugeMetricFamily(
            "tandem_map_epoch",
            "Epoch of the portion map this worker holds",
            value=m.epoch if m else 0,
        )
        yield GaugeMetricFamily(
            "tandem_group_members", "Members in that map", value=len(m.members) if m else 0
        )
        yield GaugeMetricFamily(
            "tandem_is_coordinator",
            "1 while this worker is the coordinator of that map",
            value=int(m is not None and m.coordinator == w.name),
        )
        yield GaugeMetricFamily("tandem_slot", "This worker's slot (-1: none yet)", value=w.slot)

    def _sets(self) -> Iterator[Metric]:
        last = self._w.last_manifest
        if last is None:
            return
        rpo = rpo_seconds(last)
        assert rpo is not None
        yield GaugeMetricFamily(
            "tandem_rpo_seconds",
            "Age of the newest update in the last committed set: what a restore now would lose",
            value=rpo,
        )
        yield GaugeMetricFamily(
            "tandem_last_committed_set_id", "Id of the last committed set", value=last.set_id
        )
        yield GaugeMetricFamily(
            "tandem_last_committed_set_timestamp_seconds",
            "When the last committed set's manifest was written (Unix time)",
            value=last.committed_ms / 1000,
        )
        yield GaugeMetricFamily(
            "tandem_last_committed_window_end_seconds",
            "End of the last committed set's window, T_N (Unix time)",
            value=last.window_end_ms / 1000,
        )

    def _owned(self) -> Iterator[Metric]:
        w = self._w
        sequenced = CounterMetricFamily(
            "tandem_records_sequenced",
            "Updates this worker read and numbered as owner, since it took the portion",
            labels=PORTION,
        )
        mirrored = CounterMetricFamily(
            "tandem_records_mirrored",
            "Updates this worker's mirror acknowledged holding, since it took the portion",
            labels=PORTION,
        )
        in_flight = GaugeMetricFamily(
            "tandem_in_flight_records",
            "Updates read but not yet in a committed set (held by owner and mirror)",
            labels=PORTION,
        )
        held = w.sender.held if w.sender is not None else {}
        for portion, st in sorted(w.portions.items()):
            labels = [portion[0], str(portion[1])]
            sequenced.add_metric(labels, st.sequenced)
            acked = sum(r.last_seq - r.first_seq + 1 for r in held.get(portion, []))
            mirrored.add_metric(labels, acked)
            in_flight.add_metric(labels, len(st.unsecured))
        yield sequenced
        yield mirrored
        yield in_flight
        yield GaugeMetricFamily(
            "tandem_owned_portions", "Portions this worker owns", value=len(w.portions)
        )
        started = w.sender.send_started if w.sender is not None else None
        yield GaugeMetricFamily(
            "tandem_mirror_send_pending_seconds",
            "How long the mirror send in flight has waited for the backup cluster to "
            "acknowledge it (0: none waiting); grows while the backup cluster stalls",
            value=time.monotonic() - started if started is not None else 0.0,
        )
        yield GaugeMetricFamily(
            "tandem_unprotected_portions",
            "Owned portions whose oldest unsecured update has one holder (no mirror, or the "
            "new mirror has not acknowledged the re-send yet)",
            value=sum(unprotected(o) for o in w.owned()) if w.sender is not None else 0,
        )

    def _mirrored(self) -> Iterator[Metric]:
        store = self._w.store
        received = CounterMetricFamily(
            "tandem_mirror_records_received",
            "Copies this worker received as mirror",
            labels=PORTION,
        )
        for portion, h in sorted(store.portions.items()):
            received.add_metric([portion[0], str(portion[1])], h.received)
        yield received
        yield GaugeMetricFamily(
            "tandem_mirror_store_records",
            "Copies this worker holds as mirror, not yet covered by a committed set",
            value=store.held(),
        )
        yield GaugeMetricFamily(
            "tandem_mirror_store_portions",
            "Portions this worker mirrors",
            value=len(store.portions),
        )
        yield CounterMetricFamily(
            "tandem_malformed_records",
            "Undecodable records skipped on internal topics",
            value=store.malformed,
        )
