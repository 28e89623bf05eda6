"""The owner's side of a portion: reading it from primary and numbering its updates.

Sequence numbers are contiguous per portion and never reused: a new owner continues from
where the copies (or, later, the last committed set) end, so numbering is a pure function
of that base and the primary log. That is also why two owners that overlap briefly during
a takeover can only ever agree on a number.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from aiokafka import ConsumerRecord

from connector.messages import MirroredRecord, RecordHeader
from connector.sets import PortionSets, Windows

Portion = tuple[str, int]
INGEST_HEADER = "tandem.ingest"  # on a primary record an owner appended for an ingest request


class Placed(NamedTuple):
    """Where an ingested record landed in its portion: the answer to its request."""

    offset: int
    seq: int
    timestamp: int


@dataclass
class PortionState:
    topic: str
    partition: int
    next_offset: int
    next_seq: int
    sets: PortionSets
    mirror: str | None = None
    sequenced: int = 0
    unsecured: deque[MirroredRecord] = field(default_factory=deque)
    stop_after: int | None = None  # a handover boundary: the last set this owner forms
    # Idempotency key -> place, for records carrying INGEST_HEADER: numbered here like any
    # other record, in primary order, so the ingest path learns its seq instead of making one.
    ingested: dict[str, Placed] = field(default_factory=dict)

    @property
    def stopped(self) -> bool:
        """Sealed through the handover boundary: nothing more to read until the map moves."""
        return self.stop_after is not None and self.sets.open > self.stop_after

    @property
    def portion(self) -> Portion:
        return (self.topic, self.partition)

    def take(self, records: Iterable[ConsumerRecord[bytes, bytes]]) -> list[MirroredRecord]:
        """Number the records that follow the current position; anything earlier was seen.

        Records past a handover boundary are left for the next owner.
        """
        out: list[MirroredRecord] = []
        for r in records:
            if r.offset < self.next_offset:
                continue
            if self.stop_after is not None and (
                self.stopped or r.timestamp > self.sets.windows.end_ms(self.stop_after)
            ):
                # The set after the boundary belongs to the next owner: not even numbered here.
                self.sets.seal_through(self.stop_after, r.offset)
                break
            # The client already typed every field: validating each record again was the
            # owner's largest per-record cost (bench/, docs/bench).
            rec = MirroredRecord.model_construct(
                offset=r.offset,
                seq=self.next_seq,
                timestamp=r.timestamp,
                timestamp_type=r.timestamp_type,
                key=r.key,
                value=r.value,
                headers=[RecordHeader.model_construct(key=k, value=v) for k, v in r.headers],
            )
            # Into its set at once: a boundary met later in this batch cuts after it.
            self.sets.add(rec)
            self._note_ingested(rec)
            out.append(rec)
            self.next_seq += 1
            self.next_offset = r.offset + 1
        self.sequenced += len(out)
        self.unsecured.extend(out)
        return out

    def _note_ingested(self, rec: MirroredRecord) -> None:
        key = next((h.value for h in rec.headers if h.key == INGEST_HEADER), None)
        if key is not None:
            self.ingested[key.decode(errors="replace")] = Placed(rec.offset, rec.seq, rec.timestamp)

    def tick(self, now_ms: int, grace_ms: int, position: int, high_watermark: int | None) -> None:
        """Seal idle windows, never past a handover boundary."""
        self.sets.tick(now_ms, grace_ms, position, high_watermark, last=self.stop_after)

    def secure_through(self, last_seq: int) -> None:
        """A committed set holds everything up to last_seq: no need to keep it twice."""
        while self.unsecured and self.unsecured[0].seq <= last_seq:
            self.unsecured.popleft()

    @classmethod
    def resume(
        cls,
        portion: Portion,
        windows: Windows,
        *,
        set_id: int,
        base_offset: int,
        base_seq: int,
        copies: list[MirroredRecord],
    ) -> PortionState:
        """Continue after the last secured point (set_id starts there) and the copies past it.

        The copies are re-cut into sets by the same rule the previous owner used, so the
        open set is rewritten whole from them.
        """
        state = cls(
            portion[0],
            portion[1],
            next_offset=base_offset,
            next_seq=base_seq,
            sets=PortionSets(windows, set_id, base_offset, base_seq),
        )
        for rec in copies:
            if rec.seq < state.next_seq:
                continue
            if rec.seq != state.next_seq or rec.offset < state.next_offset:
                raise RuntimeError(
                    f"{portion}: mirrored copies do not continue at seq {state.next_seq} / "
                    f"offset {state.next_offset} (found seq {rec.seq} at offset {rec.offset})"
                )
            state.unsecured.append(rec)
            state.sets.add(rec)
            state._note_ingested(rec)
            state.next_seq = rec.seq + 1
            state.next_offset = rec.offset + 1
        return state


class Backpressure:
    """Stops an owner reading the primary while it holds too many unsecured updates.

    Every update read stays in memory until a committed set covers it, so when sets stall
    (backup cluster slow, coordinator gone) the owner would grow without end; instead it
    pauses at ``limit`` and reads again once commits bring it under ``resume_at``. While
    engaged, an idle-window seal may cut at the position read so far: a window holding more
    than the limit still closes, and what it could not read goes into the next set as late.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.resume_at = limit * 3 // 4
        self.engaged = False

    def update(self, portions: Iterable[PortionState]) -> bool:
        held = sum(len(st.unsecured) for st in portions)
        if held >= self.limit:
            self.engaged = True
        elif held <= self.resume_at:
            self.engaged = False
        return self.engaged
