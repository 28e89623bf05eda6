"""The restore's target: does it fit, what of it is ours, where each partition continues.

A ``RestorePlan`` in ``<group>.restore`` on the target tells a rerun that a non-empty topic
holds its own partial restore, and from which offset; any other non-empty topic is foreign
data (see ``connector.restore`` for why restored offsets must stay dense).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from aiokafka import TopicPartition

from connector.clients import Admin, AsyncProducer, Outgoing, TopicSpec
from connector.config import ClusterConfig, Settings
from connector.errors import MalformedMessage, TandemError, UsageError
from connector.messages import SCHEMA_HEADER, RestorePlan, decode, header
from connector.ranges import FETCH
from connector.reader import partition_ends, read_until_end, standalone_consumer
from connector.restore_plan import PartitionPlan, RestoreRequest

log = logging.getLogger(__name__)


async def target_shapes(
    plans: list[PartitionPlan], backup_admin: Admin
) -> dict[str, tuple[str, int]]:
    """Per target topic: its primary topic and partition count. The backup topic has the
    primary's partition count, so the primary cluster is not needed (it may be gone)."""
    counts = await backup_admin.partition_counts()
    out: dict[str, tuple[str, int]] = {}
    for plan in plans:
        backup_topic = plan.entries[-1][1].backup_topic
        n = counts.get(backup_topic)
        if n is None:
            raise TandemError(f"backup topic {backup_topic} does not exist")
        seen = out.setdefault(plan.target[0], (plan.portion[0], n))
        if seen[0] != plan.portion[0]:
            raise UsageError(
                f"--topic-map sends both {seen[0]} and {plan.portion[0]} to {plan.target[0]}"
            )
    return out


def check_partition_counts(
    shapes: Mapping[str, tuple[str, int]], target_counts: Mapping[str, int], where: str
) -> None:
    for name, (source, n) in sorted(shapes.items()):
        have = target_counts.get(name)
        if have is not None and have != n:
            raise UsageError(
                f"target topic {name} on {where} has {have} partitions, but {source} has {n}: "
                "a restore keeps every record in its partition; delete the topic or choose "
                "another with --topic-map"
            )


async def place(
    settings: Settings,
    request: RestoreRequest,
    plans: list[PartitionPlan],
    shapes: Mapping[str, tuple[str, int]],
    target_counts: Mapping[str, int],
) -> list[RestorePlan]:
    """Set each partition's base and what is already there; the plans still to be written.

    The target's own plan makes a non-empty topic ours; without one it is foreign data.
    """
    existing = await _read_restore_plans(settings, request.target, target_counts)
    tps = [TopicPartition(t, p) for t in shapes if t in target_counts for p in range(shapes[t][1])]
    async with standalone_consumer(request.target.aiokafka(), **FETCH) as consumer:
        ends = await partition_ends(consumer, tps, timeout_s=request.timeout_s)
    by_target: dict[str, list[PartitionPlan]] = {}
    for plan in plans:
        by_target.setdefault(plan.target[0], []).append(plan)
    new: list[RestorePlan] = []
    for name, (source, n) in sorted(shapes.items()):
        span = {p: ends.get(TopicPartition(name, p), (0, 0)) for p in range(n)}
        mine = existing.get(name)
        if mine is not None and (mine.group, mine.topic, len(mine.bases)) == (
            settings.group,
            source,
            n,
        ):
            bases = list(mine.bases)
        else:
            held = {p: e - s for p, (s, e) in span.items() if e > s}
            if held and not request.force:
                where = ", ".join(f"[{p}] {k:,}" for p, k in sorted(held.items())[:8])
                whose = (
                    f"restored from group {mine.group!r} topic {mine.topic}"
                    if mine is not None
                    else "not written by a restore of this group"
                )
                raise UsageError(
                    f"target topic {name} is not empty ({sum(held.values()):,} records: "
                    f"{where}) and was {whose}; refusing to mix it with the restore. Restore "
                    "into another topic (--topic-map) or append after it with --force"
                )
            bases = [span[p][1] for p in range(n)]
            new.append(
                RestorePlan(
                    group=settings.group,
                    topic=source,
                    target_topic=name,
                    bases=bases,
                    created_ms=int(time.time() * 1000),
                )
            )
        for plan in by_target[name]:
            partition = plan.target[1]
            plan.base = bases[partition]
            end = span[partition][1]
            if end < plan.base:
                raise TandemError(
                    f"target {name}[{partition}] ends at offset {end}, before the restore's "
                    f"base {plan.base}: records were deleted; restore into a fresh topic"
                )
            plan.present = end - plan.base
            if plan.present > plan.total:
                raise UsageError(
                    f"target {name}[{partition}] already holds {plan.present:,} restored "
                    f"records, more than the {plan.total:,} of this restore: it was restored "
                    "from a later set (or with --include-unsecured); restore into a fresh topic "
                    "(--topic-map)"
                )
    return new


def _plans_topic(settings: Settings) -> str:
    return f"{settings.group}.restore"


async def _read_restore_plans(
    settings: Settings, target: ClusterConfig, target_counts: Mapping[str, int]
) -> dict[str, RestorePlan]:
    topic = _plans_topic(settings)
    out: dict[str, RestorePlan] = {}
    if topic not in target_counts:
        return out
    async with standalone_consumer(target.aiokafka()) as consumer:
        async for _tp, records in read_until_end(consumer, [TopicPartition(topic, 0)]):
            for r in records:
                try:
                    plan = decode(RestorePlan, r.value, header(list(r.headers), SCHEMA_HEADER))
                except MalformedMessage as exc:
                    log.warning("skipping malformed record on %s at %d: %s", topic, r.offset, exc)
                    continue
                out[plan.target_topic] = plan
    return out


async def prepare_target(
    settings: Settings,
    request: RestoreRequest,
    shapes: Mapping[str, tuple[str, int]],
    target_counts: Mapping[str, int],
    new_plans: list[RestorePlan],
    admin: Admin,
) -> None:
    """Create missing topics, then record new plans: a plan is written (and acknowledged)
    before the first record, so a crash at any later point leaves a target a rerun owns."""
    specs = [TopicSpec(n, k) for n, (_, k) in sorted(shapes.items()) if n not in target_counts]
    if new_plans:
        specs.append(TopicSpec(_plans_topic(settings), 1, (("retention.ms", "-1"),)))
    await admin.ensure_topics(specs)
    if not new_plans:
        return
    producer = AsyncProducer(request.target.confluent())
    try:
        await producer.send_many(
            [
                Outgoing(
                    _plans_topic(settings),
                    p.encode(),
                    p.target_topic.encode(),
                    partition=0,
                    headers=p.headers(),
                )
                for p in new_plans
            ]
        )
    finally:
        await producer.close()


__all__ = ["check_partition_counts", "place", "prepare_target", "target_shapes"]
