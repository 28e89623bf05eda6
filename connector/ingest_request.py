"""Requests to the ingest endpoint: parsing, refusals, and the partition a record goes to.

The shape follows Confluent REST Proxy v3's produce API so existing habits carry over; every
refusal names the problem, because a client without a Kafka library has nothing else to go
on. The partitioner is Kafka's default (murmur2), so a record lands where a Kafka producer
would have put it.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from connector.errors import TandemError
from connector.messages import RecordHeader

MAX_BODY_BYTES = 1024 * 1024  # Apache Kafka's default record limit is about this
MAX_BATCH = 500
KEY_CHARS = frozenset(chr(c) for c in range(0x21, 0x7F))


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
