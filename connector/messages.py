"""Messages Tandem writes to Kafka, as pydantic models encoded with Avro (schemas/).

Every message is schemaless Avro, and the Kafka header ``tandem.schema`` names the schema and
its fingerprint. A reader that knows the writer's fingerprint resolves with Avro's rules; a
reader that does not (an older worker reading a newer message) reads with its own schema.
That second case is why schemas evolve only by appending top-level fields with defaults:
an old reader then decodes the fields it knows and ignores the rest.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import fastavro
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form
from pydantic import BaseModel, ConfigDict

from connector.errors import MalformedMessage

SCHEMA_HEADER = "tandem.schema"


def _schema_dir() -> Path:
    here = Path(__file__).resolve().parent.parent / "schemas"
    if here.is_dir():
        return here
    installed = Path(sys.prefix) / "share" / "tandem" / "schemas"
    if installed.is_dir():
        return installed
    raise FileNotFoundError(f"Avro schemas not found in {here} or {installed}")


@cache
def _schema(name: str) -> tuple[Any, str]:
    raw = json.loads((_schema_dir() / f"{name}.avsc").read_text())
    parsed = parse_schema(raw)
    return parsed, fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO")


class Message(BaseModel):
    """Base of every Avro-backed message; the subclass names its schema file."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    schema_name: ClassVar[str]

    def encode(self) -> bytes:
        schema, _ = _schema(self.schema_name)
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, schema, self.model_dump())
        return buf.getvalue()

    def schema_header(self) -> tuple[str, bytes]:
        _, fp = _schema(self.schema_name)
        return SCHEMA_HEADER, f"{self.schema_name}@{fp}".encode()

    def headers(self) -> list[tuple[str, bytes]]:
        return [self.schema_header()]


M = TypeVar("M", bound=Message)

_known_writers: dict[str, Any] = {}


def register_writer_schema(name: str, raw_schema: dict[str, Any]) -> str:
    """Make an older (or newer) writer schema known, so its messages resolve exactly."""
    parsed = parse_schema(raw_schema)
    fp = fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO")
    _known_writers[f"{name}@{fp}"] = parsed
    return fp


def decode(cls: type[M], data: bytes | None, schema_tag: bytes | None = None) -> M:
    """Decode one message; anything unreadable becomes MalformedMessage naming the schema."""
    if data is None:
        raise MalformedMessage(f"{cls.schema_name}: empty record value")
    reader, fp = _schema(cls.schema_name)
    writer = reader
    if schema_tag is not None:
        tag = schema_tag.decode(errors="replace")
        name, _, their_fp = tag.partition("@")
        if name != cls.schema_name:
            raise MalformedMessage(f"expected a {cls.schema_name} message, got {tag!r}")
        if their_fp != fp:
            writer = _known_writers.get(tag, reader)
    try:
        obj = fastavro.schemaless_reader(io.BytesIO(data), writer, reader)
        return cls.model_validate(obj)
    except Exception as exc:  # fastavro raises many types on garbage input
        raise MalformedMessage(f"cannot decode {cls.schema_name}: {exc}") from exc


def header(headers: Sequence[tuple[str, bytes | None]] | None, key: str) -> bytes | None:
    for k, v in headers or ():
        if k == key:
            return v
    return None


class RecordHeader(BaseModel):
    model_config = ConfigDict(frozen=True)
    key: str
    value: bytes | None = None


class MirroredRecord(BaseModel):
    """One primary update as the owner read it: enough to write it to backup byte-identical."""

    model_config = ConfigDict(frozen=True)
    offset: int
    seq: int
    timestamp: int
    timestamp_type: int = 0
    key: bytes | None = None
    value: bytes | None = None
    headers: list[RecordHeader] = []


class MirrorEnvelope(Message):
    schema_name: ClassVar[str] = "MirrorEnvelope"
    group: str
    owner: str
    mirror: str
    epoch: int
    topic: str
    partition: int
    first_seq: int
    last_seq: int
    set_id: int = -1
    records: list[MirroredRecord]
    handoff: bool = False

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            self.schema_header(),
            ("tandem.owner", self.owner.encode()),
            ("tandem.mirror", self.mirror.encode()),
            ("tandem.portion", f"{self.topic}:{self.partition}".encode()),
            ("tandem.seq", f"{self.first_seq}-{self.last_seq}".encode()),
            ("tandem.set", str(self.set_id).encode()),
            ("tandem.epoch", str(self.epoch).encode()),
        ]


class HeldRange(BaseModel):
    model_config = ConfigDict(frozen=True)
    mirror: str
    first_seq: int
    last_seq: int


class OwnedPortion(BaseModel):
    model_config = ConfigDict(frozen=True)
    topic: str
    partition: int
    mirror: str | None = None
    next_offset: int
    next_seq: int
    sequenced: int
    mirrored_ranges: list[HeldRange] = []
    in_flight: int = 0


class MirroredPortion(BaseModel):
    model_config = ConfigDict(frozen=True)
    topic: str
    partition: int
    owner: str
    held: int
    received: int
    last_seq: int


class MemberAnnouncement(Message):
    schema_name: ClassVar[str] = "MemberAnnouncement"
    member: str
    slot: int
    epoch: int
    at_ms: int
    started_ms: int
    http_url: str | None = None
    leaving: bool = False
    map_digest: str = ""
    owned: list[OwnedPortion]
    mirrored: list[MirroredPortion]
    malformed: int = 0
    joining: bool = False


class PortionReport(BaseModel):
    model_config = ConfigDict(frozen=True)
    topic: str
    partition: int
    first_offset: int
    next_offset: int
    first_seq: int
    last_seq: int
    count: int
    backup_first_offset: int
    backup_next_offset: int
    checksum: str
    late: int = 0
    max_timestamp: int = -1
    mirror: str | None = None


class SetReport(Message):
    schema_name: ClassVar[str] = "SetReport"
    set_id: int
    epoch: int
    member: str
    slot: int
    window_start_ms: int
    window_end_ms: int
    portions: list[PortionReport]


class Acknowledgement(Message):
    schema_name: ClassVar[str] = "Acknowledgement"
    kind: str
    from_member: str
    to_member: str
    epoch: int
    topic: str
    partition: int
    first_seq: int
    last_seq: int
    offset: int = -1
    request_id: str | None = None
    error: str | None = None
    timestamp: int = -1


class IngestRequest(Message):
    """A posted record on its way from the worker that received it to its portion's owner."""

    schema_name: ClassVar[str] = "IngestRequest"
    request_id: str
    from_member: str
    to_member: str
    reply_slot: int
    epoch: int
    topic: str
    partition: int
    key: bytes | None = None
    value: bytes | None = None
    record_headers: list[RecordHeader] = []


class HandoverMove(BaseModel):
    model_config = ConfigDict(frozen=True)
    topic: str
    partition: int
    from_member: str
    to_member: str


class Handover(Message):
    """A membership change planned at a set boundary (protocol step 5).

    The old owners of ``moves`` stop their portions at the cut of ``set_id``; joiners join
    and leavers leave once manifest ``set_id`` is committed, so the set in formation is
    never split between two owners.
    """

    schema_name: ClassVar[str] = "Handover"
    epoch: int
    set_id: int
    at_ms: int
    coordinator: str
    joining: list[str] = []
    leaving: list[str] = []
    moves: list[HandoverMove] = []
    reason: str = ""

    def moving_from(self, member: str) -> list[tuple[str, int]]:
        return [(m.topic, m.partition) for m in self.moves if m.from_member == member]


class ManifestPortion(PortionReport):
    """A portion's report as the manifest commits it, with where and by whom it was written."""

    backup_topic: str
    owner: str


class GroupCheckpoint(BaseModel):
    """An application group's committed primary offset, as seen when a manifest was written."""

    model_config = ConfigDict(frozen=True)
    group: str
    topic: str
    partition: int
    offset: int


class Manifest(Message):
    schema_name: ClassVar[str] = "Manifest"
    set_id: int
    group: str
    window_start_ms: int
    window_end_ms: int
    committed_ms: int
    epoch: int
    coordinator: str
    members: list[str]
    late: int = 0
    portions: list[ManifestPortion]
    checkpoints: list[GroupCheckpoint] = []


class RestorePlan(Message):
    schema_name: ClassVar[str] = "RestorePlan"
    group: str
    topic: str
    target_topic: str
    bases: list[int]
    created_ms: int


class MapMember(BaseModel):
    model_config = ConfigDict(frozen=True)
    name: str
    slot: int
    kafka_member_id: str


class MapPortion(BaseModel):
    model_config = ConfigDict(frozen=True)
    topic: str
    partition: int
    owner: str
    mirror: str | None = None


class PortionMap(Message):
    """The whole portion map; every member receives the same one."""

    schema_name: ClassVar[str] = "PortionMap"
    epoch: int
    coordinator: str
    first_window: int = -1
    members: list[MapMember]
    portions: list[MapPortion]

    def digest(self) -> str:
        return hashlib.sha256(self.encode()).hexdigest()[:16]

    def portion(self, topic: str, partition: int) -> MapPortion | None:
        for p in self.portions:
            if p.topic == topic and p.partition == partition:
                return p
        return None

    def slot_of(self, name: str) -> int:
        for m in self.members:
            if m.name == name:
                return m.slot
        raise KeyError(name)


class HeldPortion(BaseModel):
    model_config = ConfigDict(frozen=True)
    topic: str
    partition: int


class MemberMetadata(Message):
    schema_name: ClassVar[str] = "MemberMetadata"
    name: str
    slot: int = -1
    epoch: int = 0
    first_window: int = -1
    owned: list[HeldPortion] = []
    mirrored: list[HeldPortion] = []
    leaving: bool = False


class GroupConfig(Message):
    """The settings all members of a group must share (``connector.groupconfig``)."""

    schema_name: ClassVar[str] = "GroupConfig"
    member: str
    at_ms: int
    interval_ms: int
    grace_ms: int
    max_workers: int
    topic_prefix: str
    topics: list[str]
    topic_regex: str | None = None


CONTROL_TYPES: dict[str, type[Message]] = {
    cls.schema_name: cls
    for cls in (MemberAnnouncement, SetReport, Acknowledgement, Handover, PortionMap, GroupConfig)
}


def decode_control(value: bytes | None, headers: Sequence[tuple[str, bytes | None]]) -> Message:
    """Decode a record of <group>.control by the schema its header names."""
    tag = header(headers, SCHEMA_HEADER)
    if tag is None:
        raise MalformedMessage("control record without a tandem.schema header")
    name = tag.decode(errors="replace").partition("@")[0]
    cls = CONTROL_TYPES.get(name)
    if cls is None:
        raise MalformedMessage(f"control record of unknown schema {name!r}")
    return decode(cls, value, tag)
