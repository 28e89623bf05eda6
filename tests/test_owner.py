"""Numbering and set cutting at a handover boundary, without a broker."""

from __future__ import annotations

from aiokafka import ConsumerRecord

from connector.owner import Backpressure, PortionState
from connector.sets import Windows

W = Windows(interval_ms=1000, first_window=100)  # set N ends at (100 + N) s


def rec(offset: int, ts: int) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic="t",
        partition=0,
        offset=offset,
        timestamp=ts,
        timestamp_type=0,
        key=b"k",
        value=f"v{offset}".encode(),
        checksum=None,
        serialized_key_size=1,
        serialized_value_size=2,
        headers=(),
    )


def fresh() -> PortionState:
    return PortionState.resume(("t", 0), W, set_id=0, base_offset=0, base_seq=0, copies=[])


def test_a_boundary_met_mid_batch_cuts_after_every_earlier_record_of_the_batch() -> None:
    st = fresh()
    st.stop_after = 1
    end1 = W.end_ms(1)
    batch = [rec(0, end1 - 1500), rec(1, end1 - 10), rec(2, end1), rec(3, end1 + 1), rec(4, end1)]
    taken = st.take(batch)
    assert [r.offset for r in taken] == [0, 1, 2]
    assert st.stopped and st.next_offset == 3 and st.next_seq == 3
    piece0, piece1 = st.sets.sealed(0), st.sets.sealed(1)
    assert piece0 is not None and piece1 is not None
    assert [r.offset for r in piece0.records] == [0]
    assert [r.offset for r in piece1.records] == [1, 2]
    assert piece1.next_offset == 3  # the next owner starts exactly at offset 3, seq 3
    assert st.take([rec(3, end1 + 1)]) == [] and st.next_offset == 3


def test_an_idle_portion_seals_through_the_boundary_and_no_further() -> None:
    st = fresh()
    st.stop_after = 1
    st.tick(now_ms=W.end_ms(5) + 100, grace_ms=0, position=0, high_watermark=0)
    assert st.stopped and st.sets.open == 2
    assert st.sets.sealed(1) is not None and st.sets.sealed(2) is None


def test_without_a_boundary_numbering_goes_on() -> None:
    st = fresh()
    taken = st.take([rec(0, W.end_ms(0) - 1), rec(1, W.end_ms(3) + 1)])
    assert [r.seq for r in taken] == [0, 1] and not st.stopped and st.sets.open == 4


def test_backpressure_engages_at_the_limit_and_releases_below_three_quarters() -> None:
    st = fresh()
    st.take([rec(i, 100_000) for i in range(100)])
    bp = Backpressure(limit=100)
    assert bp.update([st])
    st.secure_through(10)  # 89 left: still above 75
    assert bp.update([st])
    st.secure_through(30)  # 69 left
    assert not bp.update([st])


def test_a_held_back_owner_still_closes_a_window_larger_than_its_limit() -> None:
    """Sealing at the position read so far: the rest of the window goes in later, as late."""
    st = fresh()
    st.take([rec(i, 100_000) for i in range(5)])
    st.tick(now_ms=101_000, grace_ms=500, position=5, high_watermark=5)  # backpressure's view
    assert st.sets.sealed(0) is not None and st.sets.sealed(0).next_offset == 5  # type: ignore[union-attr]
    st.take([rec(5, 100_000)])
    assert st.sets.pieces[1].late == 1
