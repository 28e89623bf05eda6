"""Protocol step 7: synchronous two-copy ingest, the push path.

Any worker accepts ``POST /v1/topics/{topic}/records`` and places the record in the portion
Kafka's default partitioner would choose (murmur2 of the key; a record without a key by
murmur2 of its idempotency key, so that a retry lands in the same portion and is
recognised there). Only the portion's owner ever writes the portion to the primary:

- A worker that does not own the portion writes the request to ``<group>.ingest``, in the
  partition of the owner's slot, with ``acks=all``: once the cluster acknowledged it the
  request is held durably, and only then is the owner (who reads that partition) asked. The
  worker then waits for the owner's ``Acknowledgement`` on its own slot's partition, and sends
  the request again after ``RESEND_S`` or under a new map, so an owner that dies mid-request
  is replaced by the next one without the client noticing.
- The owner appends the record to the primary with the header ``tandem.ingest=<key>`` and
  does not number it: its read loop numbers it when it reads it back, in primary order, like
  every other record (``PortionState.take`` notes the key). Numbering stays contiguous and
  in primary order, and happens exactly once, on the pull path.
- The owner answers once the record's sequence number is held by the portion's mirror (an
  acknowledged mirror envelope) or by a committed set. The answer therefore always names an
  update that two workers hold under the ordinary protocol, which failover knows how to
  recover; the forwarding worker's request copy is what makes the forward durable and
  repeatable, it is never counted as the second holder.

Idempotency: one primary record per key and portion. The owner learns every key already in
the primary before it appends anything for a portion it took over: it reads the portion from
``IDEMPOTENCY_WINDOW_S`` ago to its end and waits until its read loop has numbered every
ingested record found past its own position. A previous owner appends nothing after that
point: a live one drains its appends on revocation (before the group can reassign), a dead
one stopped when it died. Within one ownership, appends in flight are shared by key. So a
retry with the same key, to any worker, after any crash, finds the first record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from bisect import bisect_left
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiokafka import ConsumerRecord, TopicPartition

from connector.clients import AsyncProducer, Outgoing
from connector.errors import MalformedMessage, TandemError
from connector.ingest_request import (
    MAX_BATCH,
    Draft,
    Refused,
    default_partition,
    idempotency_key,
    json_body,
    parse_record,
    unavailable,
)
from connector.messages import (
    SCHEMA_HEADER,
    Acknowledgement,
    IngestRequest,
    decode,
    header,
)
from connector.owner import INGEST_HEADER, Placed, Portion, PortionState
from connector.reader import read_until_end, standalone_consumer

if TYPE_CHECKING:
    from connector.worker import Worker

log = logging.getLogger(__name__)

REQUEST_TIMEOUT_S = 20.0  # covers a failover (session timeout + rebalance) with the default 10 s
RESEND_S = 2.0
IDEMPOTENCY_WINDOW_S = 3600  # a retry within this long after the first attempt is recognised
PRUNE_EVERY_S = 60.0
PLACED, RETRY = "ingest", "ingest-retry"  # Acknowledgement kinds

# -- the component ---------------------------------------------------------------------------


@dataclass
class _Owned:
    """Ingest bookkeeping of one owned portion, for as long as one PortionState owns it."""

    state: PortionState
    scan: asyncio.Task[None] | None = None
    appending: dict[str, asyncio.Task[int]] = field(default_factory=dict)
    pruned_at: float = field(default_factory=time.monotonic)


class Ingest:
    """One worker's push path: the forwarding side and the owner's side.

    It owns two producers (primary and backup cluster), the reader of its slot's partition
    of ``<group>.ingest``, and the tasks answering forwarded requests; ``close()`` ends them.
    """

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        s = worker.settings
        self._topic = s.ingest_topic
        self._source_client = s.source.aiokafka()
        self._backup_client = s.backup_cluster.aiokafka()
        self._primary: AsyncProducer | None = None
        self._backup: AsyncProducer | None = None
        self._owned: dict[Portion, _Owned] = {}
        self._waiting: dict[str, asyncio.Future[Acknowledgement]] = {}
        self._appends: set[asyncio.Task[int]] = set()
        self._answering: set[asyncio.Task[None]] = set()
        self.malformed = 0

    async def start(self) -> None:
        s = self._worker.settings
        # linger 1 ms: a synchronous client waits for each record, so batching buys little.
        self._primary = AsyncProducer({**s.source.confluent(), "linger.ms": 1})
        self._backup = AsyncProducer({**s.backup_cluster.confluent(), "linger.ms": 1})

    async def close(self) -> None:
        for task in [*self._answering, *self._appends]:
            task.cancel()
        await asyncio.gather(*self._answering, *self._appends, return_exceptions=True)
        for producer in (self._primary, self._backup):
            if producer is not None:
                await producer.close()

    async def quiesce(self) -> None:
        """On revocation: no append may land after the group could give the portion away.

        The caller has already marked the worker as rebalancing, so no new append starts.
        """
        await asyncio.gather(*self._appends, return_exceptions=True)

    def partitions(self, topic: str) -> int:
        m = self._worker.map
        if m is None:
            raise unavailable("starting: no portion map yet", 2)
        n = sum(1 for p in m.portions if p.topic == topic)
        if n == 0:
            raise Refused(
                404, f"topic {topic} is not a primary topic of group {self._worker.settings.group}"
            )
        return n

    # -- receiving side ----------------------------------------------------------------------

    async def place(self, topic: str, partition: int, draft: Draft, request_id: str) -> Placed:
        """Place a record and return where it is once two workers hold it.

        The first look at the map refuses at once when there is no owner to ask (the client
        is better off retrying elsewhere or later); after that, owner changes are waited
        out until the deadline, because the request may already be in the primary.
        """
        w = self._worker
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REQUEST_TIMEOUT_S
        first = True
        reason = ""
        while loop.time() < deadline:
            m = w.map
            entry = m.portion(topic, partition) if m is not None else None
            if m is None or entry is None or w.metrics.rebalancing or w.slot < 0:
                reason = "rebalancing: the portion has no owner right now"
                if first:
                    raise unavailable(reason)
                await asyncio.sleep(0.1)
                continue
            first = False
            req = IngestRequest(
                request_id=request_id,
                from_member=w.name,
                to_member=entry.owner,
                reply_slot=w.slot,
                epoch=m.epoch,
                topic=topic,
                partition=partition,
                key=draft.key,
                value=draft.value,
                record_headers=draft.headers,
            )
            try:
                if entry.owner == w.name:
                    return await self.own(req, deadline)
                return await self._forward(req, m.slot_of(entry.owner), deadline)
            except TandemError as exc:  # Refused, or a cluster that did not take the request
                if isinstance(exc, Refused) and exc.status != 503:
                    raise
                reason = str(exc)
                await asyncio.sleep(0.1)  # the owner said "not now": a new map usually follows
        fut = self._waiting.pop(request_id, None)
        if fut is not None:
            fut.cancel()  # a request of the same key waiting here now gets its 503 too
        raise unavailable(f"not placed within {REQUEST_TIMEOUT_S:.0f} s: {reason}", 2)

    async def _forward(self, req: IngestRequest, slot: int, deadline: float) -> Placed:
        assert self._backup is not None
        fut = self._waiting.get(req.request_id)
        if fut is None or fut.done():
            fut = self._waiting[req.request_id] = asyncio.get_running_loop().create_future()
        await self._backup.send(
            Outgoing(
                self._topic,
                req.encode(),
                req.request_id.encode(),
                partition=slot,
                headers=req.headers(),
            )
        )
        remaining = deadline - asyncio.get_running_loop().time()
        done, _ = await asyncio.wait({fut}, timeout=max(0.0, min(RESEND_S, remaining)))
        if not done or fut.cancelled():
            raise unavailable(f"no answer from {req.to_member} yet")
        ack = fut.result()
        if ack.kind != PLACED:
            raise unavailable(f"{ack.from_member}: {ack.error}")
        return Placed(ack.offset, ack.first_seq, ack.timestamp)

    def _answered(self, ack: Acknowledgement) -> None:
        if ack.to_member != self._worker.name or ack.request_id is None:
            return
        fut = self._waiting.pop(ack.request_id, None)
        if fut is not None and not fut.done():
            fut.set_result(ack)

    # -- owner side --------------------------------------------------------------------------

    async def own(self, req: IngestRequest, deadline: float) -> Placed:
        """As the owner: append once per key, then wait until two workers hold the record."""
        portion = (req.topic, req.partition)
        owned = await self._known(portion, deadline)
        key = req.request_id
        if key not in owned.state.ingested:
            task = owned.appending.get(key)
            if task is None:
                self._check_owner(portion, owned.state)
                task = asyncio.create_task(self._append(req))
                owned.appending[key] = task
                self._appends.add(task)
                task.add_done_callback(self._appends.discard)
            remaining = deadline - asyncio.get_running_loop().time()
            done, _ = await asyncio.wait({task}, timeout=max(0.0, remaining))
            if not done:
                raise unavailable("the primary did not acknowledge the append in time", 2)
            if task.exception() is not None:
                # The record may be in the primary anyway: look again before any new append.
                owned.appending.pop(key, None)
                owned.scan = None
                raise unavailable(f"appending to the primary failed: {task.exception()}", 2)
        placed = await self._held_twice(portion, owned.state, key, deadline)
        owned.appending.pop(key, None)
        return placed

    def _check_owner(self, portion: Portion, state: PortionState | None) -> PortionState:
        w = self._worker
        if w.metrics.rebalancing:
            raise unavailable("rebalancing: the portion map is changing")
        if state is None or w.portions.get(portion) is not state:
            raise unavailable(f"{w.name} does not own {portion[0]}[{portion[1]}] now")
        if state.stop_after is not None:
            raise unavailable(
                f"{portion[0]}[{portion[1]}] moves to another worker after set {state.stop_after}"
            )
        return state

    async def _known(self, portion: Portion, deadline: float) -> _Owned:
        """The portion's bookkeeping, once every key already in the primary is known."""
        state = self._check_owner(portion, self._worker.portions.get(portion))
        owned = self._owned.get(portion)
        if owned is None or owned.state is not state:
            owned = self._owned[portion] = _Owned(state)
        if owned.scan is None:
            owned.scan = asyncio.create_task(self._scan(state))
        scan = owned.scan
        remaining = deadline - asyncio.get_running_loop().time()
        done, _ = await asyncio.wait({scan}, timeout=max(0.0, remaining))
        if not done:
            raise unavailable(f"still reading the keys of {portion[0]}[{portion[1]}]", 2)
        if scan.exception() is not None:
            if owned.scan is scan:
                owned.scan = None
            raise unavailable(
                f"cannot read the keys of {portion[0]}[{portion[1]}]: {scan.exception()}", 2
            )
        self._prune(owned)
        return owned

    async def _scan(self, state: PortionState) -> None:
        """Learn the keys a previous owner (or this one, before) put in the primary.

        Records before this owner's position were numbered already: their seq follows by
        counting back from ``next_seq``. Records past it will be numbered by the read loop,
        which this waits for, so afterwards ``state.ingested`` holds every key there is.
        """
        portion = state.portion
        tp = TopicPartition(*portion)
        at_offset, at_seq = state.next_offset, state.next_seq
        since_ms = int(time.time() * 1000) - IDEMPOTENCY_WINDOW_S * 1000
        offsets: list[int] = []
        keyed: list[tuple[int, str, int]] = []
        async with standalone_consumer(self._source_client) as consumer:
            found = await consumer.offsets_for_times({tp: since_ms})
            start = min(found[tp].offset if found.get(tp) else at_offset, at_offset)
            async for _tp, records in read_until_end(consumer, [tp], start={tp: start}):
                for r in records:
                    offsets.append(r.offset)
                    k = header(r.headers, INGEST_HEADER)
                    if k is not None:
                        keyed.append((r.offset, k.decode(errors="replace"), r.timestamp))
        below = bisect_left(offsets, at_offset)
        last = -1
        for offset, key, timestamp in keyed:
            if offset < at_offset:
                seq = at_seq - (below - bisect_left(offsets, offset))
                if seq >= 0:  # else before this group's first base: never numbered
                    state.ingested.setdefault(key, Placed(offset, seq, timestamp))
            else:
                last = offset
        deadline = time.monotonic() + REQUEST_TIMEOUT_S
        while state.next_offset <= last:
            if time.monotonic() > deadline or self._worker.portions.get(portion) is not state:
                raise TandemError(f"the read loop did not reach offset {last}")
            await asyncio.sleep(0.02)
        log.info(
            "ingest: %s[%d] holds %d known keys after reading from offset %d",
            portion[0],
            portion[1],
            len(state.ingested),
            start,
        )

    def _prune(self, owned: _Owned) -> None:
        """Forget keys older than the idempotency window, so memory stays bounded."""
        if time.monotonic() - owned.pruned_at < PRUNE_EVERY_S:
            return
        owned.pruned_at = time.monotonic()
        cutoff = int(time.time() * 1000) - IDEMPOTENCY_WINDOW_S * 1000
        st = owned.state
        st.ingested = {k: p for k, p in st.ingested.items() if p.timestamp >= cutoff}

    async def _append(self, req: IngestRequest) -> int:
        assert self._primary is not None
        headers = [(h.key, h.value) for h in req.record_headers]
        headers.append((INGEST_HEADER, req.request_id.encode()))
        _, offset = await self._primary.send(
            Outgoing(req.topic, req.value, req.key, partition=req.partition, headers=headers)
        )
        return offset

    async def _held_twice(
        self, portion: Portion, state: PortionState, key: str, deadline: float
    ) -> Placed:
        """Wait until the record is numbered and its mirror (or a committed set) holds it."""
        sender = self._worker.sender
        assert sender is not None
        loop = asyncio.get_running_loop()
        while True:
            async with sender.progress:
                placed = state.ingested.get(key)
                if placed is not None and self._twice(portion, state, placed.seq):
                    return placed
                self._check_owner(portion, state)
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise unavailable("not yet held by two workers", 2)
                # Mirror acks notify; a committed set does not, hence the bounded wait.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(sender.progress.wait(), min(remaining, 0.25))

    def _twice(self, portion: Portion, state: PortionState, seq: int) -> bool:
        w = self._worker
        assert w.sender is not None
        m = w.last_manifest
        if m is not None and any(
            (mp.topic, mp.partition) == portion and mp.last_seq >= seq for mp in m.portions
        ):
            return True
        return state.mirror is not None and any(
            r.mirror == state.mirror and r.first_seq <= seq <= r.last_seq
            for r in w.sender.held.get(portion, ())
        )

    async def _answer(self, req: IngestRequest) -> None:
        """Place a forwarded request as its owner and tell the forwarding worker."""
        assert self._backup is not None
        deadline = asyncio.get_running_loop().time() + REQUEST_TIMEOUT_S
        try:
            placed = await self.own(req, deadline)
            ack = self._ack(req, PLACED, placed, None)
        except Refused as exc:
            ack = self._ack(req, RETRY, Placed(-1, -1, -1), exc.message)
        try:
            await self._backup.send(
                Outgoing(
                    self._topic,
                    ack.encode(),
                    req.request_id.encode(),
                    partition=req.reply_slot,
                    headers=ack.headers(),
                )
            )
        except TandemError as exc:  # the forwarder re-sends while it waits: it asks again
            log.warning("ingest: cannot answer %s for %s: %s", req.from_member, req.request_id, exc)

    def _ack(
        self, req: IngestRequest, kind: str, placed: Placed, error: str | None
    ) -> Acknowledgement:
        w = self._worker
        return Acknowledgement(
            kind=kind,
            from_member=w.name,
            to_member=req.from_member,
            epoch=w.map.epoch if w.map else 0,
            topic=req.topic,
            partition=req.partition,
            first_seq=placed.seq,
            last_seq=placed.seq,
            offset=placed.offset,
            timestamp=placed.timestamp,
            request_id=req.request_id,
            error=error,
        )

    # -- the slot's partition of <group>.ingest ---------------------------------------------

    async def run(self) -> None:
        """Read requests for this owner and answers for this forwarder, following the slot.

        It starts at the partition's end: a request sent before is either answered already
        or re-sent by its forwarder, which never stops re-sending while it waits.
        """
        async with standalone_consumer(self._backup_client, fetch_max_wait_ms=20) as consumer:
            tp: TopicPartition | None = None
            while True:
                slot = self._worker.slot
                if slot < 0:
                    await asyncio.sleep(0.1)
                    continue
                if tp is None or tp.partition != slot:
                    tp = TopicPartition(self._topic, slot)
                    consumer.assign([tp])
                    await consumer.seek_to_end(tp)
                batch = await consumer.getmany(tp, timeout_ms=200, max_records=1000)
                for r in batch.get(tp, []):
                    self._accept(r)

    def _accept(self, r: ConsumerRecord[bytes, bytes]) -> None:
        tag = header(list(r.headers), SCHEMA_HEADER) or b""
        try:
            if tag.startswith(b"IngestRequest@"):
                req = decode(IngestRequest, r.value, tag)
                if req.to_member == self._worker.name:
                    task = asyncio.create_task(self._answer(req), name="ingest-answer")
                    self._answering.add(task)
                    task.add_done_callback(self._answering.discard)
            else:
                self._answered(decode(Acknowledgement, r.value, tag or None))
        except MalformedMessage as exc:
            self.malformed += 1
            log.warning("skipping malformed record on %s: %s", self._topic, exc)


# -- routes ----------------------------------------------------------------------------------

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
INGEST: web.AppKey[Ingest] = web.AppKey("ingest")


def _refusal(exc: Refused) -> web.Response:
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
    return web.json_response(
        {"error_code": exc.status, "message": exc.message}, status=exc.status, headers=headers
    )


def _answering(handler: Handler) -> Handler:
    async def run(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except Refused as exc:
            return _refusal(exc)

    return run


def _success(topic: str, partition: int, placed: Placed, key: str) -> dict[str, Any]:
    """REST Proxy v3's produce response, plus the sequence number and the key it answers."""
    stamp = datetime.fromtimestamp(placed.timestamp / 1000, UTC).isoformat(timespec="milliseconds")
    return {
        "error_code": 200,
        "topic_name": topic,
        "partition_id": partition,
        "offset": placed.offset,
        "sequence_number": placed.seq,
        "timestamp": stamp.replace("+00:00", "Z"),
        "idempotency_key": key,
    }


async def _one(
    ingest: Ingest, topic: str, partitions: int, draft: Draft, key: str
) -> dict[str, Any]:
    if draft.partition is not None:
        partition = draft.partition
    else:
        partition = default_partition(
            draft.key if draft.key is not None else key.encode(), partitions
        )
    placed = await ingest.place(topic, partition, draft, key)
    return _success(topic, partition, placed, key)


@_answering
async def post_record(request: web.Request) -> web.StreamResponse:
    """One record; 200 only once two workers hold it."""
    ingest = request.app[INGEST]
    topic = request.match_info["topic"]
    key = idempotency_key(request) or uuid.uuid4().hex
    body = await json_body(request)
    partitions = ingest.partitions(topic)
    draft = parse_record(body, topic, partitions)
    return web.json_response(await _one(ingest, topic, partitions, draft, key))


@_answering
async def post_batch(request: web.Request) -> web.StreamResponse:
    """REST Proxy v3's batch form: ``{"entries": [{"id": ..., <record>}, ...]}`` -> 207.

    The whole batch is checked before anything is placed, so a malformed entry refuses the
    batch (400) instead of leaving it half written. Each entry's idempotency key is the
    request's key and the entry id, so retrying the batch places nothing twice.
    """
    ingest = request.app[INGEST]
    topic = request.match_info["topic"]
    base = idempotency_key(request) or uuid.uuid4().hex
    body = await json_body(request)
    entries = body.get("entries") if isinstance(body, dict) else None
    if not isinstance(entries, list) or not entries or set(body) != {"entries"}:
        raise Refused(400, 'the body must be {"entries": [<record with an "id">, ...]}')
    if len(entries) > MAX_BATCH:
        raise Refused(413, f"{len(entries)} entries: a batch holds at most {MAX_BATCH}")
    partitions = ingest.partitions(topic)
    drafts: dict[str, Draft] = {}
    for n, entry in enumerate(entries):
        entry_id = entry.get("id") if isinstance(entry, dict) else None
        if not isinstance(entry_id, str) or not entry_id or entry_id in drafts:
            raise Refused(400, f"entry {n}: needs an id, a string unique in the batch")
        drafts[entry_id] = parse_record(entry, topic, partitions, f"entry {entry_id}: ")

    async def one(entry_id: str, draft: Draft) -> dict[str, Any]:
        try:
            return {
                "id": entry_id,
                **await _one(ingest, topic, partitions, draft, f"{base}/{entry_id}"),
            }
        except Refused as exc:
            return {"id": entry_id, "error_code": exc.status, "message": exc.message}

    results = await asyncio.gather(*(one(i, d) for i, d in drafts.items()))
    return web.json_response(
        {
            "successes": [r for r in results if r["error_code"] == 200],
            "failures": [r for r in results if r["error_code"] != 200],
        },
        status=207,
    )


def add_routes(app: web.Application, ingest: Ingest) -> None:
    app[INGEST] = ingest
    app.router.add_post("/v1/topics/{topic}/records", post_record)
    app.router.add_post("/v1/topics/{topic}/records:batch", post_batch)
