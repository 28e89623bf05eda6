"""One configuration per group: a second group under the same name is refused at start.

Two fleets started with the same ``group`` share ``<group>.mirror``, ``.control`` and
``.sets``. If their windows, slots, backup prefix or topics differ they would commit sets
on different schedules into the same manifests and number the same portions twice, so the
first worker records the settings that shape those topics on the control topic, and every
later worker compares its own with that record before it joins. The first record wins: a
control topic has one partition, so two workers that start at once agree on which came
first.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from connector.clients import AsyncProducer, Outgoing
from connector.config import Settings
from connector.control import read_control
from connector.errors import ConfigError
from connector.messages import GroupConfig

log = logging.getLogger(__name__)

SHARED = ("interval_ms", "grace_ms", "max_workers", "topic_prefix", "topics", "topic_regex")


def group_config(settings: Settings) -> GroupConfig:
    return GroupConfig(
        member=settings.member_id,
        at_ms=int(time.time() * 1000),
        interval_ms=int(settings.window.interval_s * 1000),
        grace_ms=int(settings.window.grace_s * 1000),
        max_workers=settings.mirror.max_workers,
        topic_prefix=settings.backup.topic_prefix,
        topics=sorted(settings.source.topics),
        topic_regex=settings.source.topic_regex,
    )


def differences(recorded: GroupConfig, mine: GroupConfig) -> list[str]:
    """``field: recorded -> mine`` for every shared setting that differs."""
    return [
        f"{name}: {getattr(recorded, name)!r} (group) vs {getattr(mine, name)!r} (this worker)"
        for name in SHARED
        if getattr(recorded, name) != getattr(mine, name)
    ]


async def _recorded(client: dict[str, Any], topic: str) -> GroupConfig | None:
    view = await read_control(client, topic)
    return next((m for m in view.others if isinstance(m, GroupConfig)), None)


async def claim_group_config(
    producer: AsyncProducer, client: dict[str, Any], settings: Settings
) -> None:
    """Record this worker's settings if the group has none yet; refuse to run if they differ."""
    mine = group_config(settings)
    recorded = await _recorded(client, settings.control_topic)
    if recorded is None:
        await producer.send(
            Outgoing(settings.control_topic, mine.encode(), b"group-config", headers=mine.headers())
        )
        recorded = await _recorded(client, settings.control_topic)
    if recorded is None:
        raise ConfigError(f"group configuration not readable from {settings.control_topic}")
    diff = differences(recorded, mine)
    if diff:
        raise ConfigError(
            f"group {settings.group!r} already runs with other settings (recorded by "
            f"{recorded.member} on {settings.control_topic}): {'; '.join(diff)}. Start this "
            "worker with the group's settings, or give it another group name"
        )
    log.info("group configuration of %s matches the recorded one", settings.group)
