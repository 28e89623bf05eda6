"""Checkpoints as the coordinator records them, against the real broker."""

from __future__ import annotations

from confluent_kafka import Consumer, TopicPartition

from connector.checkpoints import read_checkpoints
from connector.clients import Admin
from connector.messages import GroupCheckpoint


async def test_committed_offsets_of_listed_groups(bootstrap: str, unique: str, make_topics) -> None:
    topic, app, idle = f"cp-{unique}", f"app-{unique}", f"idle-{unique}"
    make_topics(bootstrap, {topic: 2})
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": app})
    c.commit(offsets=[TopicPartition(topic, 1, 42)], asynchronous=False)
    c.close()
    admin = Admin({"bootstrap.servers": bootstrap})
    try:
        got = await read_checkpoints(admin, [app, idle], [(topic, 0), (topic, 1)])
    finally:
        await admin.close()
    # nothing committed on partition 0, nor by the idle group: no checkpoint, not offset 0
    assert got == [GroupCheckpoint(group=app, topic=topic, partition=1, offset=42)]


async def test_an_unreachable_primary_records_none_instead_of_failing() -> None:
    admin = Admin({"bootstrap.servers": "127.0.0.1:1"}, timeout_s=1)
    try:
        assert await read_checkpoints(admin, ["app"], [("t", 0)]) == []
    finally:
        await admin.close()
