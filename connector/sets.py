"""Protocol step 3: consistent transaction sets, as each owner forms them for its portions.

Windows end at wall-clock multiples of ``interval``; set N ends at window ``first_window + N``.
A portion's set N ends at its cut: the first offset whose record is stamped later than
T_N, or, for a portion with nothing after T_N yet, the high watermark read after
T_N + grace. Numbering of sets is thus a function of the records and the clock, the same
for whichever worker owns the portion.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from connector.messages import MirroredRecord, PortionReport

SET_HEADER = "tandem.set"
SEQ_HEADER = "tandem.seq"
OFFSET_HEADER = "tandem.offset"
OWNER_HEADER = "tandem.owner"
TANDEM_HEADERS = (SET_HEADER, SEQ_HEADER, OFFSET_HEADER, OWNER_HEADER)


@dataclass(frozen=True)
class Windows:
    interval_ms: int
    first_window: int

    def end_ms(self, set_id: int) -> int:
        """T_N. Before set 0 there is no window: everything earlier belongs to set 0."""
        return (self.first_window + set_id) * self.interval_ms

    def start_ms(self, set_id: int) -> int:
        return self.end_ms(set_id - 1) if set_id > 0 else 0

    def set_at(self, t_ms: int) -> int:
        """The first set whose window ends at or after t_ms."""
        return max(0, -(-t_ms // self.interval_ms) - self.first_window)

    @staticmethod
    def first_window_after(now_ms: int, interval_ms: int) -> int:
        return now_ms // interval_ms + 1


def checksum(
    records: Iterable[tuple[bytes | None, bytes | None, Sequence[tuple[str, bytes | None]], int]],
) -> str:
    """Digest of a set's records of one portion: key, value, original headers, timestamp.

    Length-prefixed so no two different records hash alike by shifting bytes between fields;
    None and empty bytes differ (a tombstone is not an empty value).
    """
    h = hashlib.sha256()

    def put(b: bytes | None) -> None:
        if b is None:
            h.update(b"\xff\xff\xff\xff")
        else:
            h.update(struct.pack(">I", len(b)))
            h.update(b)

    for key, value, headers, ts in records:
        put(key)
        put(value)
        h.update(struct.pack(">I", len(headers)))
        for hk, hv in headers:
            put(hk.encode())
            put(hv)
        h.update(struct.pack(">q", ts))
    return h.hexdigest()[:32]


def record_fields(
    r: MirroredRecord,
) -> tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]], int]:
    return r.key, r.value, [(h.key, h.value) for h in r.headers], r.timestamp


@dataclass
class Piece:
    """One portion's part of one set, as it forms."""

    set_id: int
    first_offset: int
    first_seq: int
    records: list[MirroredRecord] = field(default_factory=list)
    late: int = 0
    next_offset: int | None = None  # the cut, once sealed

    @property
    def sealed(self) -> bool:
        return self.next_offset is not None

    def report(
        self, topic: str, partition: int, backup_range: tuple[int, int], mirror: str | None
    ) -> PortionReport:
        assert self.next_offset is not None
        return PortionReport(
            topic=topic,
            partition=partition,
            first_offset=self.first_offset,
            next_offset=self.next_offset,
            first_seq=self.first_seq,
            last_seq=self.first_seq + len(self.records) - 1,
            count=len(self.records),
            backup_first_offset=backup_range[0],
            backup_next_offset=backup_range[1],
            checksum=checksum(record_fields(r) for r in self.records),
            late=self.late,
            max_timestamp=max((r.timestamp for r in self.records), default=-1),
            mirror=mirror,
        )


class PortionSets:
    """Cuts one portion's numbered records into sets, in primary order."""

    def __init__(self, windows: Windows, set_id: int, first_offset: int, first_seq: int) -> None:
        self.windows = windows
        self.pieces: dict[int, Piece] = {set_id: Piece(set_id, first_offset, first_seq)}
        self.open = set_id

    def add(self, rec: MirroredRecord) -> None:
        while rec.timestamp > self.windows.end_ms(self.open):
            self._seal(rec.offset)
        piece = self.pieces[self.open]
        piece.records.append(rec)
        if self.open > 0 and rec.timestamp <= self.windows.end_ms(self.open - 1):
            piece.late += 1

    def tick(
        self,
        now_ms: int,
        grace_ms: int,
        position: int,
        high_watermark: int | None,
        last: int | None = None,
    ) -> None:
        """Seal idle windows: past T_N + grace and read up to the high watermark.

        ``last`` is the last set this owner may seal (a handover boundary).
        """
        while (
            (last is None or self.open <= last)
            and now_ms >= self.windows.end_ms(self.open) + grace_ms
            and high_watermark is not None
            and position >= high_watermark
        ):
            self._seal(position)

    def seal_through(self, last: int, cut: int) -> None:
        """End every set up to ``last`` at ``cut``: the portion moves on at that boundary."""
        while self.open <= last:
            self._seal(cut)

    def _seal(self, cut: int) -> None:
        piece = self.pieces[self.open]
        piece.next_offset = cut
        nxt = self.open + 1
        self.pieces[nxt] = Piece(nxt, cut, piece.first_seq + len(piece.records))
        self.open = nxt

    def sealed(self, set_id: int) -> Piece | None:
        piece = self.pieces.get(set_id)
        return piece if piece is not None and piece.sealed else None

    def drop(self, set_id: int) -> None:
        self.pieces.pop(set_id, None)
