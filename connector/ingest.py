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
import base64
import binascii
import contextlib
import json
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
from connector.messages import (
    SCHEMA_HEADER,
    Acknowledgement,
    IngestRequest,
    RecordHeader,
    decode,
    header,
)
from connector.owner import INGEST_HEADER, Placed, Portion, PortionState
from connector.reader import read_until_end, standalone_consumer

if TYPE_CHECKING:
    from connector.worker import Worker

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024  # Apache Kafka's default record limit is about this
MAX_BATCH = 500
REQUEST_TIMEOUT_S = 20.0  # covers a failover (session timeout + rebalance) with the default 10 s
RESEND_S = 2.0
IDEMPOTENCY_WINDOW_S = 3600  # a retry within this long after the first attempt is recognised
PRUNE_EVERY_S = 60.0
KEY_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))
PLACED, RETRY = "ingest", "ingest-retry"


class Refused(TandemError):
    """A request that gets no record: the HTTP status, and for 503 when to try again."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after
        self.retriable = status == 503


def unavailable(message: str, retry_after: int = 1) -> Refused:
    return Refused(503, message, retry_after)


# -- placing a record in a portion -----------------------------------------------------------


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (``Utils.murmur2``), as an unsigned 32-bit value."""
    m, mask = 0x5BD1E995, 0xFFFFFFFF
    length = len(data)
    h = (0x9747B28C ^ length) & mask
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * m) & mask
        k ^= k >> 24
        k = (k * m) & mask
        h = ((h * m) & mask) ^ k
    tail = length - length % 4
    rest = length % 4
    if rest == 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h


def default_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (and librdkafka's ``murmur2``) picks."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


# -- request parsing -------------------------------------------------------------------------


@dataclass(frozen=True)
class Draft:
    """One record as a client posted it, decoded; the partition if the client chose one."""

    key: bytes | None
    value: bytes | None
    headers: list[RecordHeader]
    partition: int | None


def _data(name: str, given: Any) -> bytes | None:
    """REST Proxy v3's typed data (``{"type": "BINARY"|"STRING"|"JSON", "data": ...}``).

    Anything else is JSON and is stored as its compact JSON text, as v3 does for JSON data.
    """
    if given is None:
        return None
    if isinstance(given, dict) and "type" in given and set(given) <= {"type", "data"}:
        kind, data = given["type"], given.get("data")
        if data is None:
            return None
        if kind == "BINARY":
            if not isinstance(data, str):
                raise Refused(400, f"{name}: BINARY data must be a base64 string")
            try:
                return base64.b64decode(data, validate=True)
            except binascii.Error as exc:
                raise Refused(400, f"{name}: BINARY data is not base64: {exc}") from exc
        if kind == "STRING":
            if not isinstance(data, str):
                raise Refused(400, f"{name}: STRING data must be a string")
            return data.encode()
        if kind == "JSON":
            given = data
        else:
            raise Refused(400, f"{name}: type must be BINARY, STRING or JSON, not {kind!r}")
    return json.dumps(given, separators=(",", ":")).encode()


def _headers(given: Any) -> list[RecordHeader]:
    if given is None:
        return []
    if not isinstance(given, list):
        raise Refused(400, 'headers must be a list of {"name": ..., "value": <base64>}')
    out = []
    for h in given:
        if (
            not isinstance(h, dict)
            or not isinstance(h.get("name"), str)
            or set(h)
            - {
                "name",
                "value",
            }
        ):
            raise Refused(400, f'header {h!r} must be {{"name": <string>, "value": <base64>}}')
        if h["name"].startswith("tandem."):
            raise Refused(400, f"header {h['name']!r}: names starting tandem. are reserved")
        value = h.get("value")
        if value is not None:
            if not isinstance(value, str):
                raise Refused(400, f"header {h['name']!r}: value must be a base64 string")
            try:
                value = base64.b64decode(value, validate=True)
            except binascii.Error as exc:
                raise Refused(400, f"header {h['name']!r}: value is not base64: {exc}") from exc
        out.append(RecordHeader(key=h["name"], value=value))
    return out


RECORD_FIELDS = frozenset({"key", "value", "headers", "partition_id", "partition"})


def parse_record(body: Any, topic: str, partitions: int, where: str = "") -> Draft:
    """A record object; any unknown field is refused, since a typo would otherwise be lost."""
    if not isinstance(body, dict):
        raise Refused(400, f"{where}the record must be a JSON object")
    unknown = set(body) - RECORD_FIELDS - ({"id"} if where else set())
    if unknown:
        raise Refused(400, f"{where}unknown field(s) {', '.join(sorted(unknown))}")
    partition = body.get("partition_id", body.get("partition"))
    if partition is not None:
        if not isinstance(partition, int) or isinstance(partition, bool):
            raise Refused(400, f"{where}partition_id must be an integer")
        if not 0 <= partition < partitions:
            raise Refused(
                404,
                f"{where}partition {partition} of topic {topic} does not exist "
                f"({partitions} partitions)",
            )
    try:
        return Draft(
            _data("key", body.get("key")),
            _data("value", body.get("value")),
            _headers(body.get("headers")),
            partition,
        )
    except Refused as exc:
        raise Refused(exc.status, where + exc.message) from exc


def idempotency_key(request: web.Request) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is not None and (not 0 < len(key) <= 200 or not set(key) <= KEY_CHARS):
        raise Refused(400, "Idempotency-Key must be 1 to 200 printable ASCII characters")
    return key


async def json_body(request: web.Request) -> Any:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise Refused(
            413,
            f"request body of {request.content_length} bytes is larger than the limit "
            f"of {MAX_BODY_BYTES} bytes",
        )
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise Refused(
            413, f"request body is larger than the limit of {MAX_BODY_BYTES} bytes"
        ) from exc
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Refused(400, f"malformed JSON: {exc}") from exc


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
            except Refused as exc:
                if exc.status != 503:
                    raise
                reason = exc.message
                await asyncio.sleep(0.1)  # the owner said "not now": a new map usually follows
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
        if not done:
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
        await self._backup.send(
            Outgoing(
                self._topic,
                ack.encode(),
                req.request_id.encode(),
                partition=req.reply_slot,
                headers=ack.headers(),
            )
        )

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
