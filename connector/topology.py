"""Primary topics and partitions that appear or disappear while the group runs.

The group learns of them from the consumer's metadata (``source.metadata_max_age_ms``):
aiokafka rebalances when a subscribed topic's partition count changes or, with
``source.topic_regex``, when a matching topic is created or deleted, and the assignor
then maps exactly the portions that exist. What the map alone cannot do is make room on
the backup cluster, and a deleted topic must not pass silently: both happen here, each
time a new map is applied.
"""

from __future__ import annotations

import logging
from collections import Counter

from connector.clients import Admin, TopicSpec
from connector.config import Settings
from connector.messages import PortionMap

log = logging.getLogger(__name__)


def partition_counts(m: PortionMap) -> dict[str, int]:
    """Partitions per primary topic as the map knows them (the assignor maps all of them)."""
    counts: Counter[str] = Counter()
    for p in m.portions:
        counts[p.topic] = max(counts[p.topic], p.partition + 1)
    return dict(counts)


async def follow_topology(
    admin: Admin, settings: Settings, previous: PortionMap | None, new: PortionMap
) -> None:
    """Before anyone writes a set with the new map: every backup topic has its portions.

    A new primary topic gets its backup topic; a primary topic with added partitions gets
    its backup topic grown to match (Kafka's CreatePartitions; a cluster without it raises
    TopicError naming the topic). A topic that left the map is logged: its last sets stay
    in the backup, and sets go on without it.
    """
    counts = partition_counts(new)
    before = partition_counts(previous) if previous is not None else {}
    if previous is not None:
        for topic in sorted(set(before) - set(counts)):
            log.warning(
                "primary topic %s is no longer in the map (deleted, or no longer matches "
                "source.topic_regex): sets go on without it; its backup topic %s keeps "
                "the sets committed so far",
                topic,
                settings.backup_topic(topic),
            )
    if counts == before:
        return
    for topic in sorted(counts):
        if topic in before and counts[topic] != before[topic]:
            log.info(
                "primary topic %s now has %d partitions (was %d)",
                topic,
                counts[topic],
                before[topic],
            )
    await admin.ensure_topics(
        [
            TopicSpec(settings.backup_topic(t), n, settings.backup_topic_config)
            for t, n in sorted(counts.items())
        ],
        grow=True,
    )
