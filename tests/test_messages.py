"""Every Avro-backed message survives a round trip, evolves by Avro's rules, and fails loudly.

Round trips go through the same calls the workers use: ``encode()`` plus the ``tandem.schema``
header on the way out, ``decode()`` / ``decode_control()`` on the way in. Schema evolution is
tested both ways the design promises: an old reader with a newer writer's message (appended
top-level field with a default, unknown fingerprint) and a new reader with an older writer's
message (a defaulted field missing, writer schema registered).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.schema import fingerprint, parse_schema, to_parsing_canonical_form
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from connector.errors import MalformedMessage
from connector.messages import (
    CONTROL_TYPES,
    SCHEMA_HEADER,
    Acknowledgement,
    GroupCheckpoint,
    GroupConfig,
    Handover,
    HandoverMove,
    HeldPortion,
    HeldRange,
    IngestRequest,
    Manifest,
    ManifestPortion,
    MapMember,
    MapPortion,
    MemberAnnouncement,
    MemberMetadata,
    Message,
    MirroredPortion,
    MirroredRecord,
    MirrorEnvelope,
    OwnedPortion,
    PortionMap,
    PortionReport,
    RecordHeader,
    RestorePlan,
    SetReport,
    decode,
    decode_control,
    header,
    register_writer_schema,
)

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"

INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
OPT_BYTES = st.none() | st.binary(max_size=64)


# -- helpers ---------------------------------------------------------------------------------


def _raw_schema(name: str) -> dict[str, Any]:
    return json.loads((SCHEMAS / f"{name}.avsc").read_text())


def _fp(raw: dict[str, Any]) -> str:
    return fingerprint(to_parsing_canonical_form(parse_schema(raw)), "CRC-64-AVRO")


def _write(raw: dict[str, Any], datum: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parse_schema(raw), datum)
    return buf.getvalue()


def _tag(msg: Message) -> bytes:
    key, value = msg.schema_header()
    assert key == SCHEMA_HEADER
    return value


def _round_trip(msg: Message) -> Message:
    return decode(type(msg), msg.encode(), _tag(msg))


# -- samples of every message type -----------------------------------------------------------


def _envelope(records: list[MirroredRecord] | None = None) -> MirrorEnvelope:
    if records is None:
        records = [
            MirroredRecord(
                offset=10,
                seq=0,
                timestamp=1_700_000_000_000,
                key=b"\x00\xff\x80binary\x00",
                value=bytes(range(256)),
                headers=[RecordHeader(key="h", value=b"\x00\x01")],
            ),
            # tombstone: a key and no value
            MirroredRecord(offset=11, seq=1, timestamp=1_700_000_000_001, key=b"k", value=None),
            # empty bytes are not None, in key, value or header value
            MirroredRecord(
                offset=12,
                seq=2,
                timestamp=1_700_000_000_002,
                timestamp_type=1,
                key=b"",
                value=b"",
                headers=[RecordHeader(key="empty", value=b"")],
            ),
            # duplicate header keys keep their order; a header may have no value
            MirroredRecord(
                offset=13,
                seq=3,
                timestamp=1_700_000_000_003,
                key=None,
                value=b"v",
                headers=[
                    RecordHeader(key="dup", value=b"1"),
                    RecordHeader(key="dup", value=None),
                    RecordHeader(key="dup", value=b"2"),
                    RecordHeader(key="", value=None),
                ],
            ),
        ]
    return MirrorEnvelope(
        group="g",
        owner="w-1",
        mirror="w-2",
        epoch=7,
        topic="orders",
        partition=3,
        first_seq=records[0].seq if records else 0,
        last_seq=records[-1].seq if records else -1,
        set_id=42,
        records=records,
    )


def _announcement() -> MemberAnnouncement:
    return MemberAnnouncement(
        member="w-1",
        slot=0,
        epoch=3,
        at_ms=1_700_000_000_000,
        started_ms=1_699_999_000_000,
        http_url="http://127.0.0.1:8080",
        leaving=True,
        map_digest="0123456789abcdef",
        owned=[
            OwnedPortion(
                topic="orders",
                partition=0,
                mirror="w-2",
                next_offset=100,
                next_seq=90,
                sequenced=90,
                mirrored_ranges=[HeldRange(mirror="w-2", first_seq=0, last_seq=89)],
                in_flight=5,
            ),
            OwnedPortion(topic="orders", partition=1, next_offset=0, next_seq=0, sequenced=0),
        ],
        mirrored=[
            MirroredPortion(
                topic="orders", partition=2, owner="w-3", held=4, received=10, last_seq=9
            )
        ],
    )


def _set_report() -> SetReport:
    return SetReport(
        set_id=5,
        epoch=2,
        member="w-1",
        slot=1,
        window_start_ms=1_700_000_000_000,
        window_end_ms=1_700_000_005_000,
        portions=[
            PortionReport(
                topic="orders",
                partition=0,
                first_offset=10,
                next_offset=20,
                first_seq=10,
                last_seq=19,
                count=10,
                backup_first_offset=30,
                backup_next_offset=41,
                checksum="deadbeef",
                late=2,
                mirror="w-2",
            ),
            PortionReport(
                topic="orders",
                partition=1,
                first_offset=5,
                next_offset=5,
                first_seq=5,
                last_seq=4,
                count=0,
                backup_first_offset=0,
                backup_next_offset=0,
                checksum="",
            ),
        ],
    )


def _ack() -> Acknowledgement:
    return Acknowledgement(
        kind="mirror",
        from_member="w-2",
        to_member="w-1",
        epoch=3,
        topic="orders",
        partition=0,
        first_seq=0,
        last_seq=99,
        offset=1234,
        request_id="req-1",
    )


def _ingest_request() -> IngestRequest:
    return IngestRequest(
        request_id="pay-7",
        from_member="w-1",
        to_member="w-2",
        reply_slot=1,
        epoch=3,
        topic="payments",
        partition=2,
        key=b"customer-9",
        value=b'{"amount":5}',
        record_headers=[RecordHeader(key="trace", value=b"\x00\x01"), RecordHeader(key="n")],
    )


def _group_config() -> GroupConfig:
    return GroupConfig(
        member="w-0",
        at_ms=1_700_000_000_000,
        interval_ms=5000,
        grace_ms=1000,
        max_workers=32,
        topic_prefix="backup.",
        topics=["orders", "payments"],
        topic_regex=None,
    )


def _handover() -> Handover:
    return Handover(
        epoch=4,
        set_id=9,
        at_ms=1_700_000_000_000,
        coordinator="w-1",
        joining=["w-3"],
        leaving=[],
        moves=[HandoverMove(topic="orders", partition=2, from_member="w-1", to_member="w-3")],
        reason="w-3 joins",
    )


def _manifest() -> Manifest:
    return Manifest(
        set_id=9,
        group="g",
        window_start_ms=1_700_000_000_000,
        window_end_ms=1_700_000_005_000,
        committed_ms=1_700_000_006_000,
        epoch=4,
        coordinator="w-1",
        members=["w-1", "w-2", "w-3"],
        late=1,
        portions=[
            ManifestPortion(
                topic="orders",
                partition=0,
                first_offset=0,
                next_offset=10,
                first_seq=0,
                last_seq=9,
                count=10,
                backup_topic="backup.orders",
                backup_first_offset=0,
                backup_next_offset=11,
                checksum="abc",
                late=1,
                owner="w-1",
                mirror="w-2",
            ),
            ManifestPortion(
                topic="orders",
                partition=1,
                first_offset=0,
                next_offset=0,
                first_seq=0,
                last_seq=-1,
                count=0,
                backup_topic="backup.orders",
                backup_first_offset=0,
                backup_next_offset=0,
                checksum="",
                owner="w-2",
            ),
        ],
        checkpoints=[
            GroupCheckpoint(group="app", topic="orders", partition=0, offset=7),
            GroupCheckpoint(group="app", topic="orders", partition=1, offset=0),
        ],
    )


def _portion_map() -> PortionMap:
    return PortionMap(
        epoch=4,
        coordinator="w-1",
        members=[
            MapMember(name="w-1", slot=0, kafka_member_id="tandem-w-1-abc"),
            MapMember(name="w-2", slot=1, kafka_member_id="tandem-w-2-def"),
        ],
        portions=[
            MapPortion(topic="orders", partition=0, owner="w-1", mirror="w-2"),
            MapPortion(topic="orders", partition=1, owner="w-2", mirror=None),
        ],
    )


def _member_metadata() -> MemberMetadata:
    return MemberMetadata(
        name="w-1",
        slot=2,
        epoch=5,
        owned=[HeldPortion(topic="orders", partition=0)],
        mirrored=[HeldPortion(topic="orders", partition=1), HeldPortion(topic="x", partition=7)],
        leaving=True,
    )


def _restore_plan() -> RestorePlan:
    return RestorePlan(
        group="g",
        topic="orders",
        target_topic="orders-restored",
        bases=[0, 0, 17],
        created_ms=1_700_000_007_000,
    )


SAMPLES: dict[str, Message] = {
    "MirrorEnvelope": _envelope(),
    "MemberAnnouncement": _announcement(),
    "SetReport": _set_report(),
    "Acknowledgement": _ack(),
    "IngestRequest": _ingest_request(),
    "Handover": _handover(),
    "Manifest": _manifest(),
    "PortionMap": _portion_map(),
    "MemberMetadata": _member_metadata(),
    "RestorePlan": _restore_plan(),
    "GroupConfig": _group_config(),
}
SAMPLE_IDS = list(SAMPLES)


# -- round trips -----------------------------------------------------------------------------


def test_every_schema_file_has_a_sample() -> None:
    assert {p.stem for p in SCHEMAS.glob("*.avsc")} == set(SAMPLES)


@pytest.mark.parametrize("name", SAMPLE_IDS)
def test_round_trip(name: str) -> None:
    msg = SAMPLES[name]
    assert msg.schema_name == name
    back = _round_trip(msg)
    assert type(back) is type(msg)
    assert back == msg
    # without a tag the reader's own schema is used, which is the writer's here
    assert decode(type(msg), msg.encode()) == msg


@pytest.mark.parametrize("name", SAMPLE_IDS)
def test_minimal_message_gets_defaults(name: str) -> None:
    """Only the required fields given: the defaults survive the round trip too."""
    msg = SAMPLES[name]
    cls = type(msg)
    required = {k: getattr(msg, k) for k, f in cls.model_fields.items() if f.is_required()}
    minimal = cls(**required)
    assert _round_trip(minimal) == minimal


def test_envelope_keeps_binary_tombstones_empty_bytes_and_duplicate_headers() -> None:
    env = _envelope()
    back = decode(MirrorEnvelope, env.encode(), _tag(env))
    binary, tombstone, empty, dup = back.records
    assert binary.key == b"\x00\xff\x80binary\x00"
    assert binary.value == bytes(range(256))
    assert tombstone.value is None and tombstone.key == b"k"
    assert empty.key == b"" and empty.value == b""
    assert empty.key is not None and empty.value is not None
    assert empty.headers == [RecordHeader(key="empty", value=b"")]
    assert empty.timestamp_type == 1
    assert dup.key is None
    assert [(h.key, h.value) for h in dup.headers] == [
        ("dup", b"1"),
        ("dup", None),
        ("dup", b"2"),
        ("", None),
    ]


def test_empty_envelope_round_trips() -> None:
    env = _envelope(records=[])
    assert _round_trip(env) == env


def test_envelope_headers_name_schema_and_portion() -> None:
    env = _envelope()
    hs: list[tuple[str, bytes | None]] = list(env.headers())
    assert header(hs, SCHEMA_HEADER) == _tag(env)
    assert _tag(env).startswith(b"MirrorEnvelope@")
    assert header(hs, "tandem.owner") == b"w-1"
    assert header(hs, "tandem.mirror") == b"w-2"
    assert header(hs, "tandem.portion") == b"orders:3"
    assert header(hs, "tandem.seq") == b"0-3"
    assert header(hs, "tandem.set") == b"42"
    assert header(hs, "tandem.epoch") == b"7"


def test_portion_map_digest_is_stable_and_content_sensitive() -> None:
    a = _portion_map()
    b = _round_trip(a)
    assert isinstance(b, PortionMap)
    assert a.digest() == b.digest()
    moved = a.model_copy(
        update={"portions": [*a.portions[:1], MapPortion(topic="orders", partition=1, owner="w-1")]}
    )
    assert moved.digest() != a.digest()


header_st = st.builds(RecordHeader, key=st.text(max_size=16), value=OPT_BYTES)
record_st = st.builds(
    MirroredRecord,
    offset=INT64,
    seq=INT64,
    timestamp=INT64,
    timestamp_type=INT32,
    key=OPT_BYTES,
    value=st.none() | st.binary(max_size=512),
    headers=st.lists(header_st, max_size=6),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=st.lists(record_st, max_size=8), text=st.text(max_size=20))
def test_envelope_round_trips_any_records(records: list[MirroredRecord], text: str) -> None:
    env = MirrorEnvelope(
        group=text,
        owner=text + "o",
        mirror="m" + text,
        epoch=0,
        topic="t",
        partition=0,
        first_seq=0,
        last_seq=len(records) - 1,
        records=records,
    )
    back = decode(MirrorEnvelope, env.encode(), _tag(env))
    assert back == env
    for mine, theirs in zip(env.records, back.records, strict=True):
        # byte-identical, and None stays distinct from b""
        assert (theirs.key, theirs.value) == (mine.key, mine.value)
        assert [(h.key, h.value) for h in theirs.headers] == [
            (h.key, h.value) for h in mine.headers
        ]


@pytest.mark.parametrize("name", sorted(CONTROL_TYPES))
def test_decode_control_round_trips_every_control_type(name: str) -> None:
    msg = SAMPLES[name]
    back = decode_control(msg.encode(), list(msg.headers()))
    assert type(back) is type(msg)
    assert back == msg


# -- schema evolution ------------------------------------------------------------------------

APPENDED_FIELDS: list[dict[str, Any]] = [
    {"name": "added_long", "type": "long", "default": 0},
    {"name": "added_string", "type": "string", "default": ""},
    {"name": "added_optional", "type": ["null", "string"], "default": None},
    {
        "name": "added_list",
        "type": {
            "type": "array",
            "items": {
                "type": "record",
                "name": "AddedItem",
                "fields": [{"name": "x", "type": "long"}, {"name": "y", "type": "bytes"}],
            },
        },
        "default": [],
    },
]
APPENDED_VALUES: dict[str, Any] = {
    "added_long": 123456789,
    "added_string": "a newer writer wrote this",
    "added_optional": "present",
    "added_list": [{"x": 1, "y": b"\x00\x01"}, {"x": -2, "y": b""}],
}


@pytest.mark.parametrize("name", SAMPLE_IDS)
def test_old_reader_reads_newer_writer(name: str) -> None:
    """A newer worker appended top-level fields; this one does not know its fingerprint."""
    msg = SAMPLES[name]
    newer = _raw_schema(name)
    newer["fields"] = [*newer["fields"], *APPENDED_FIELDS]
    newer_fp = _fp(newer)
    _, ours = msg.schema_header()
    assert f"{name}@{newer_fp}".encode() != ours

    datum = {**msg.model_dump(), **APPENDED_VALUES}
    data = _write(newer, datum)
    assert len(data) > len(msg.encode())  # the appended fields really are in the bytes

    back = decode(type(msg), data, f"{name}@{newer_fp}".encode())
    assert back == msg
    assert not hasattr(back, "added_long")
    if name in CONTROL_TYPES:
        tag = f"{name}@{newer_fp}".encode()
        assert decode_control(data, [(SCHEMA_HEADER, tag)]) == msg


def _without(raw: dict[str, Any], field: str) -> dict[str, Any]:
    fields = [f for f in raw["fields"] if f["name"] != field]
    assert len(fields) == len(raw["fields"]) - 1, f"{field} not in {raw['name']}"
    return {**raw, "fields": fields}


OLDER_WRITERS = [
    # (schema, defaulted field the older writer lacked, its default on the model)
    ("Acknowledgement", "request_id", None),
    ("Acknowledgement", "offset", -1),  # not the last field: resolution, not truncation
    ("Acknowledgement", "error", None),
    ("MirrorEnvelope", "set_id", -1),
    ("MemberAnnouncement", "map_digest", ""),
    ("MemberAnnouncement", "leaving", False),
    ("Manifest", "late", 0),
    ("Manifest", "checkpoints", []),
    ("MemberMetadata", "leaving", False),
    ("MemberMetadata", "slot", -1),
    ("Handover", "reason", ""),
    ("MemberAnnouncement", "joining", False),
    ("MirrorEnvelope", "handoff", False),
]


@pytest.mark.parametrize(("name", "field", "default"), OLDER_WRITERS)
def test_new_reader_reads_older_writer(name: str, field: str, default: Any) -> None:
    msg = SAMPLES[name]
    older = _without(_raw_schema(name), field)
    fp = register_writer_schema(name, older)
    assert fp == _fp(older)
    assert f"{name}@{fp}".encode() != _tag(msg)

    datum = msg.model_dump()
    datum.pop(field)
    data = _write(older, datum)
    back = decode(type(msg), data, f"{name}@{fp}".encode())

    assert getattr(back, field) == default
    assert back == msg.model_copy(update={field: default})


def test_older_writer_nested_default_is_filled() -> None:
    """A defaulted field inside a nested record (PortionReport.late) is filled as well."""
    raw = _raw_schema("SetReport")
    items = raw["fields"][-1]["type"]["items"]
    items["fields"] = [f for f in items["fields"] if f["name"] != "mirror"]
    fp = register_writer_schema("SetReport", raw)
    msg = _set_report()
    datum = msg.model_dump()
    for p in datum["portions"]:
        p.pop("mirror")
    back = decode(SetReport, _write(raw, datum), f"SetReport@{fp}".encode())
    assert [p.mirror for p in back.portions] == [None, None]
    assert [p.checksum for p in back.portions] == [p.checksum for p in msg.portions]


# -- malformed input -------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLE_IDS)
@pytest.mark.parametrize(
    "data",
    [b"", b"\x80", b"\xff" * 11],
    ids=["empty", "cut-varint", "overlong-varint"],
)
def test_malformed_bytes_raise_malformed_message_naming_schema(name: str, data: bytes) -> None:
    cls = type(SAMPLES[name])
    with pytest.raises(MalformedMessage, match=name):
        decode(cls, data, _tag(SAMPLES[name]))


@pytest.mark.parametrize("name", SAMPLE_IDS)
def test_truncated_message_is_malformed(name: str) -> None:
    msg = SAMPLES[name]
    data = msg.encode()
    with pytest.raises(MalformedMessage, match=name):
        decode(type(msg), data[: len(data) // 2], _tag(msg))


@pytest.mark.parametrize("name", SAMPLE_IDS)
def test_none_value_is_malformed(name: str) -> None:
    with pytest.raises(MalformedMessage, match=name):
        decode(type(SAMPLES[name]), None, _tag(SAMPLES[name]))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), name=st.sampled_from(SAMPLE_IDS))
def test_garbage_never_escapes_as_another_exception(data: bytes, name: str) -> None:
    cls = type(SAMPLES[name])
    try:
        decode(cls, data, _tag(SAMPLES[name]))
    except MalformedMessage as exc:
        assert name in str(exc)


def test_wrong_schema_tag_is_malformed() -> None:
    report = _set_report()
    manifest_tag = _tag(_manifest())
    with pytest.raises(MalformedMessage, match="SetReport") as info:
        decode(SetReport, report.encode(), manifest_tag)
    assert "Manifest" in str(info.value)


@pytest.mark.parametrize("tag", [b"", b"setreport@1", b"\xff\xfe@1", b"SetReportX@1"], ids=repr)
def test_tag_not_naming_the_schema_is_malformed(tag: bytes) -> None:
    report = _set_report()
    with pytest.raises(MalformedMessage, match="SetReport"):
        decode(SetReport, report.encode(), tag)


def test_decode_control_without_schema_header() -> None:
    msg = _ack()
    with pytest.raises(MalformedMessage, match=r"tandem\.schema"):
        decode_control(msg.encode(), [])
    with pytest.raises(MalformedMessage, match=r"tandem\.schema"):
        decode_control(msg.encode(), [("tandem.owner", b"w-1")])
    with pytest.raises(MalformedMessage, match=r"tandem\.schema"):
        decode_control(msg.encode(), [(SCHEMA_HEADER, None)])


@pytest.mark.parametrize(
    "tag",
    [b"Bogus@123", b"Bogus", b"", b"\xff\xfe", b"Manifest@1", b"MirrorEnvelope@1"],
    ids=repr,
)
def test_decode_control_unknown_schema(tag: bytes) -> None:
    """Not a control type (including Manifest and MirrorEnvelope, which live elsewhere)."""
    with pytest.raises(MalformedMessage, match="unknown schema"):
        decode_control(_ack().encode(), [(SCHEMA_HEADER, tag)])


def test_decode_control_garbage_names_the_schema() -> None:
    with pytest.raises(MalformedMessage, match="Handover"):
        decode_control(b"\x80", [(SCHEMA_HEADER, _tag(_handover()))])
    with pytest.raises(MalformedMessage, match="Handover"):
        decode_control(None, [(SCHEMA_HEADER, _tag(_handover()))])


def test_decode_control_uses_the_first_schema_header() -> None:
    msg = _handover()
    hs: list[tuple[str, bytes | None]] = [(SCHEMA_HEADER, _tag(msg)), (SCHEMA_HEADER, b"Bogus@1")]
    assert decode_control(msg.encode(), hs) == msg
