"""Reading the records of committed sets from the manifests' backup ranges.

verify and restore both read exactly the ranges ``[backup_first_offset, backup_next_offset)``
a manifest names, and inside them only the records tagged with the set and its owner: a
crashed or fenced owner's leftovers may sit in those ranges on a broker that returns aborted
records (docs/broker-notes.md), and they must never count. One copy of that rule lives here.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from connector.errors import BrokerUnavailable
from connector.sets import OFFSET_HEADER, OWNER_HEADER, SEQ_HEADER, SET_HEADER, TANDEM_HEADERS

Headers = list[tuple[str, bytes | None]]

# A fetch at a partition's end waits this long on the broker; short, so that moving on
# to the next portion does not wait for it.
FETCH: dict[str, Any] = {"fetch_max_wait_ms": 50}


class RangeCursor:
    """Reads one partition forward, handing out consecutive offset ranges.

    Records fetched beyond a range wait in ``pending`` for the next range; a range that
    starts before what was already handed out (an overlap) seeks back. The end of the
    partition is the last stable offset or high watermark from a fetch, never ListOffsets.
    """

    def __init__(self, consumer: AIOKafkaConsumer, tp: TopicPartition, timeout_s: float) -> None:
        self.consumer = consumer
        self.tp = tp
        self.timeout_s = timeout_s
        self.pending: deque[ConsumerRecord[bytes, bytes]] = deque()
        self.base: int | None = None  # records >= base not handed out are pending or unread
        self.fetched_to = -1  # offset the consumer reads next

    def start(self) -> None:
        self.consumer.assign([self.tp])

    def _seek(self, offset: int) -> None:
        self.pending.clear()
        self.consumer.seek(self.tp, offset)
        self.fetched_to = offset
        self.base = offset

    def end(self) -> int | None:
        ends = [
            e
            for e in (self.consumer.highwater(self.tp), self.consumer.last_stable_offset(self.tp))
            if e is not None and e >= 0
        ]
        return min(ends) if ends else None

    async def take(self, start: int, stop: int) -> tuple[list[ConsumerRecord[bytes, bytes]], bool]:
        """Records with start <= offset < stop, and whether the range lay within the end."""
        if stop <= start:
            return [], True
        if self.base is None or start < self.base:
            self._seek(start)
        while self.pending and self.pending[0].offset < start:
            self.pending.popleft()
        if not self.pending and self.fetched_to < start:
            self._seek(start)
        self.base = start
        out: list[ConsumerRecord[bytes, bytes]] = []
        deadline = time.monotonic() + self.timeout_s
        complete = True
        while True:
            while self.pending and self.pending[0].offset < stop:
                out.append(self.pending.popleft())
            if self.pending or self.fetched_to >= stop:
                break
            batch = await self.consumer.getmany(self.tp, timeout_ms=200, max_records=10_000)
            records = batch.get(self.tp, [])
            if records:
                self.pending.extend(records)
                self.fetched_to = records[-1].offset + 1
                continue
            self.fetched_to = max(self.fetched_to, await self.consumer.position(self.tp))
            if self.fetched_to >= stop:
                break
            end = self.end()
            if end is not None and self.fetched_to >= end:
                complete = False
                break
            if time.monotonic() > deadline:
                raise BrokerUnavailable(
                    f"could not read {self.tp.topic}[{self.tp.partition}] up to offset {stop} "
                    f"in {self.timeout_s:.0f} s"
                )
        self.base = stop
        return out, complete


def split_headers(
    headers: Sequence[tuple[str, bytes | None]],
) -> tuple[Headers, dict[str, bytes | None]]:
    """Original headers, and the tandem headers appended after them."""
    hs = list(headers)
    tail: dict[str, bytes | None] = {}
    while hs and hs[-1][0] in TANDEM_HEADERS and hs[-1][0] not in tail and len(tail) < 4:
        k, v = hs.pop()
        tail[k] = v
    return hs, tail


def _int(v: bytes | None) -> int | None:
    try:
        return int(v.decode()) if v is not None else None
    except (UnicodeDecodeError, ValueError):
        return None


@dataclass
class BackupRecord:
    offset: int  # in the backup partition
    primary_offset: int | None
    seq: int | None
    key: bytes | None
    value: bytes | None
    headers: Headers
    timestamp: int


def set_records(
    records: list[ConsumerRecord[bytes, bytes]], set_id: int, owner: str
) -> tuple[list[BackupRecord], int]:
    """The set's records in a backup range, and how many others were ignored."""
    out: list[BackupRecord] = []
    ignored = 0
    want_set, want_owner = str(set_id).encode(), owner.encode()
    for r in records:
        original, tail = split_headers(list(r.headers))
        if tail.get(SET_HEADER) != want_set or tail.get(OWNER_HEADER) != want_owner:
            ignored += 1
            continue
        out.append(
            BackupRecord(
                offset=r.offset,
                primary_offset=_int(tail.get(OFFSET_HEADER)),
                seq=_int(tail.get(SEQ_HEADER)),
                key=r.key,
                value=r.value,
                headers=original,
                timestamp=r.timestamp,
            )
        )
    return out, ignored


__all__ = ["FETCH", "BackupRecord", "Headers", "RangeCursor", "set_records", "split_headers"]
