"""Consumer-group checkpoints: application offsets recorded with every manifest.

MirrorMaker 2 translates a group's offsets through sampled offset syncs and can only land
near the right record. Tandem knows each set's exact cut, so it records the application
groups' committed primary offsets when it writes a manifest and lets restore translate them
exactly (``connector.restore.translate``). The offsets are read just before the manifest is
written: whatever an application had committed by then refers to records at or before that
moment, so each offset either falls inside the restored data or maps to its end.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

from confluent_kafka import KafkaException

from connector.clients import Admin
from connector.errors import TandemError
from connector.messages import GroupCheckpoint

log = logging.getLogger(__name__)

Portion = tuple[str, int]
CheckpointSource = Callable[[list[Portion]], Awaitable[list[GroupCheckpoint]]]
"""``source(portions)``: the checkpoints to put in the manifest covering those portions."""


async def no_checkpoints(portions: list[Portion]) -> list[GroupCheckpoint]:
    """For a coordinator given no application groups."""
    return []


async def read_checkpoints(
    admin: Admin, groups: Sequence[str], portions: list[Portion]
) -> list[GroupCheckpoint]:
    """The committed offsets of ``groups`` on ``portions`` (primary cluster).

    A failure leaves this manifest without checkpoints instead of holding the set back:
    restore then uses the group's checkpoint in an earlier manifest, which is older but
    still exact for the data it covers. A set's commit must never wait on an application.
    """
    out: list[GroupCheckpoint] = []
    for group in groups:
        try:
            offsets = await admin.group_offsets(group, portions)
        except (KafkaException, TandemError, TimeoutError) as exc:
            log.warning("checkpoint of group %s not recorded: %s", group, exc)
            continue
        out.extend(
            GroupCheckpoint(group=group, topic=t, partition=p, offset=o)
            for (t, p), o in sorted(offsets.items())
        )
    return out
