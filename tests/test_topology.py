"""Backup topics follow the primary's topics and partitions (connector.topology)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest

from connector.clients import Admin, TopicSpec
from connector.config import load_settings
from connector.errors import TopicError
from connector.messages import MapMember, MapPortion, PortionMap
from connector.topology import follow_topology

SETTINGS = load_settings(source={"bootstrap_servers": "x:1", "topics": ["a", "b"]})


def portion_map(epoch: int, counts: dict[str, int]) -> PortionMap:
    return PortionMap(
        epoch=epoch,
        coordinator="w0",
        first_window=0,
        members=[MapMember(name="w0", slot=0, kafka_member_id="k0")],
        portions=[
            MapPortion(topic=t, partition=p, owner="w0", mirror=None)
            for t, n in counts.items()
            for p in range(n)
        ],
    )


class RecordingAdmin:
    def __init__(self) -> None:
        self.calls: list[tuple[list[TopicSpec], bool]] = []

    async def ensure_topics(self, specs: Sequence[TopicSpec], grow: bool = False) -> list[str]:
        self.calls.append((list(specs), grow))
        return []


async def test_new_topics_and_partitions_reach_the_backup_and_a_gone_topic_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    admin = RecordingAdmin()
    before = portion_map(1, {"a": 2, "b": 2})
    await follow_topology(admin, SETTINGS, before, portion_map(2, {"a": 2, "b": 2}))  # type: ignore[arg-type]
    assert admin.calls == []  # nothing changed: no admin round trip on every rebalance
    with caplog.at_level(logging.WARNING):
        await follow_topology(admin, SETTINGS, before, portion_map(3, {"a": 3, "c": 1}))  # type: ignore[arg-type]
    ((specs, grow),) = admin.calls
    assert grow
    assert [(s.name, s.partitions) for s in specs] == [("backup.a", 3), ("backup.c", 1)]
    assert all(("max.message.bytes", str(8 * 1024 * 1024)) in s.config for s in specs)
    assert "primary topic b is no longer in the map" in caplog.text


async def test_growing_a_topic_adds_partitions_or_names_the_topic_it_could_not_grow(
    bootstrap: str, unique: str, make_topics
) -> None:
    """On Apache Kafka the topic grows; Tansu has no CreatePartitions and must say so."""
    name = f"g-{unique}"
    make_topics(bootstrap, {name: 1})
    admin = Admin({"bootstrap.servers": bootstrap})
    try:
        try:
            await admin.ensure_topics([TopicSpec(name, 3)], grow=True)
        except TopicError as exc:
            assert f"cannot grow topic {name} to 3 partitions" in str(exc)
            assert (await admin.partition_counts())[name] == 1
        else:
            assert (await admin.partition_counts())[name] == 3
        with pytest.raises(TopicError, match=r"has (1|3) partitions"):
            await admin.ensure_topics([TopicSpec(name, 2)])  # never shrinks, never grows unasked
    finally:
        await admin.close()
