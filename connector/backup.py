"""Writing one owner's part of set N to the backup cluster: one Kafka transaction.

The order is fixed: every record of the set is already mirrored (two holders), then inside
one transaction the backup records of all the owner's portions, then the owner's report on
the control topic, then commit. A report is therefore visible (read_committed) exactly when
its records are. A commit that cannot finish within its deadline means the transactional id
was taken over or the cluster is gone: the writer raises and the worker stops, which is
safe because the mirror holds every update of the open set.
"""

from __future__ import annotations

import asyncio
import logging

from connector.clients import AsyncProducer, Outgoing
from connector.errors import Fenced, TandemError
from connector.messages import PortionReport, SetReport
from connector.sets import OFFSET_HEADER, OWNER_HEADER, SEQ_HEADER, SET_HEADER, Piece, Windows

log = logging.getLogger(__name__)

COMMIT_DEADLINE_S = 30.0


def transactional_id(group: str, slot: int) -> str:
    """Bound to the slot, so a worker that takes a dead worker's slot fences its zombie."""
    return f"{group}.slot-{slot}"


async def fence(conf: dict[str, object], txn_id: str) -> None:
    """Take a transactional id over and let it go: the previous holder's open transaction ends."""
    producer = AsyncProducer(conf, transactional_id=txn_id)
    try:
        await asyncio.wait_for(producer.init_transactions(), COMMIT_DEADLINE_S)
    finally:
        await producer.close()


class SetWriter:
    def __init__(
        self,
        producer: AsyncProducer,
        *,
        member: str,
        slot: int,
        control_topic: str,
        prefix: str,
        windows: Windows,
    ) -> None:
        self._producer = producer
        self._member = member
        self._slot = slot
        self._control = control_topic
        self._prefix = prefix
        self._windows = windows

    async def write(
        self, set_id: int, epoch: int, pieces: list[tuple[str, int, Piece, str | None]]
    ) -> SetReport:
        owner = self._member.encode()
        set_tag = str(set_id).encode()
        records: list[Outgoing] = []
        spans: list[tuple[int, int]] = []
        for topic, partition, piece, _mirror in pieces:
            start = len(records)
            for r in piece.records:
                headers = [(h.key, h.value) for h in r.headers]
                headers += [
                    (SET_HEADER, set_tag),
                    (SEQ_HEADER, str(r.seq).encode()),
                    (OFFSET_HEADER, str(r.offset).encode()),
                    (OWNER_HEADER, owner),
                ]
                records.append(
                    Outgoing(
                        topic=f"{self._prefix}{topic}",
                        value=r.value,
                        key=r.key,
                        partition=partition,
                        headers=headers,
                        timestamp=r.timestamp,
                    )
                )
            spans.append((start, len(records)))
        try:
            await self._producer.begin()
            delivered = await asyncio.wait_for(self._producer.send_many(records), COMMIT_DEADLINE_S)
            reports: list[PortionReport] = []
            for (topic, partition, piece, mirror), (a, b) in zip(pieces, spans, strict=True):
                rng = (delivered[a][1], delivered[b - 1][1] + 1) if b > a else (-1, -1)
                reports.append(piece.report(topic, partition, rng, mirror))
            report = SetReport(
                set_id=set_id,
                epoch=epoch,
                member=self._member,
                slot=self._slot,
                window_start_ms=self._windows.start_ms(set_id),
                window_end_ms=self._windows.end_ms(set_id),
                portions=reports,
            )
            await self._producer.send(
                Outgoing(
                    self._control,
                    report.encode(),
                    f"report-{set_id}-{self._member}".encode(),
                    headers=report.headers(),
                )
            )
            await asyncio.wait_for(self._producer.commit(), COMMIT_DEADLINE_S)
        except TimeoutError as exc:
            raise Fenced(
                f"set {set_id}: transaction did not complete in {COMMIT_DEADLINE_S:.0f} s; "
                "treating this worker as fenced"
            ) from exc
        except Fenced:
            raise
        except TandemError as exc:
            log.warning("set %d: transaction failed (%s), aborting", set_id, exc)
            await asyncio.wait_for(self._producer.abort(), COMMIT_DEADLINE_S)
            raise
        return report
