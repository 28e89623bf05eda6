"""Reading ``<group>.control`` from outside the workers: who is there, what they hold.

``status``, the demo and the tests use this instead of asking a worker about itself, so what
they show is what the group published, not a worker's private view.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from aiokafka import TopicPartition

from connector.errors import MalformedMessage
from connector.messages import MemberAnnouncement, Message, PortionMap, decode_control
from connector.reader import read_until_end, standalone_consumer

log = logging.getLogger(__name__)


@dataclass
class ControlView:
    announcements: dict[str, MemberAnnouncement] = field(default_factory=dict)
    maps: dict[int, PortionMap] = field(default_factory=dict)
    others: list[Message] = field(default_factory=list)
    malformed: int = 0

    @property
    def latest_map(self) -> PortionMap | None:
        return self.maps[max(self.maps)] if self.maps else None

    def live(self, now_ms: int, stale_ms: int) -> dict[str, MemberAnnouncement]:
        """Members that announced recently and did not say they were leaving."""
        return {
            m: a
            for m, a in self.announcements.items()
            if not a.leaving and now_ms - a.at_ms <= stale_ms
        }


async def read_control(client: dict[str, Any], topic: str, timeout_s: float = 30.0) -> ControlView:
    view = ControlView()
    async with standalone_consumer(client) as consumer:
        async for _tp, records in read_until_end(
            consumer, [TopicPartition(topic, 0)], timeout_s=timeout_s
        ):
            for r in records:
                try:
                    msg = decode_control(r.value, list(r.headers))
                except MalformedMessage as exc:
                    view.malformed += 1
                    log.debug("skipping control record at offset %d: %s", r.offset, exc)
                    continue
                if isinstance(msg, MemberAnnouncement):
                    view.announcements[msg.member] = msg
                elif isinstance(msg, PortionMap):
                    view.maps[msg.epoch] = msg
                else:
                    view.others.append(msg)
    return view
