"""The pure parts of the dead-letter commands and headers: reasons grouped, letters named,
what a redrive sends, and the redrive count a stage copies onto its dead letter."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from contracts import Headers
from microgrid.deadletters import (
    DeadLetter,
    DlqError,
    Listing,
    Namespace,
    Selection,
    parse_ref,
    reason_group,
    redrive_headers,
    redrive_value,
    render_value,
    safe,
)
from runtime.dlq import dlq_headers, redrive_count
from runtime.settings import Settings

VALID = "ns.telemetry.valid"


def letter(
    value: bytes | None = b"{}",
    source: str = "ns.telemetry.raw",
    count: bytes | None = None,
    reason: str = "why",
    ts_ms: int = 1_000,
    offset: int = 7,
) -> DeadLetter:
    headers = dlq_headers(reason, "ns.microgrid.validator", source, 2, 41, count)
    return DeadLetter("ns.telemetry.dlq", 3, offset, ts_ms, b"dev-1", value, tuple(headers))


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("device 'dev-1' is not registered", "device 'dev-2' is not registered"),
        (
            "device 'dev-1' belongs to another site than 'site-a'",
            "device 'x' belongs to another site than 'site-b'",
        ),
        (
            "readings[0]: ts 2026-11-30T08:00:00.123+00:00 is older than 7 days, 0:00:00",
            "readings[12]: ts 2026-11-29T23:59:59Z is older than 7 days, 0:00:00",
        ),
        (
            "record key b'abc' is not the readings' device id 'dev-1'",
            "record key b'x\\'y' is not the readings' device id 'dev-22'",
        ),
        (
            "refused by PostgreSQL: value too long\nDETAIL: (dev-1, 5)",
            "refused by PostgreSQL: value too long\nDETAIL: (dev-2, 6)",
        ),
    ],
)
def test_reasons_that_differ_in_specifics_group_together(a: str, b: str) -> None:
    assert reason_group(a) == reason_group(b)


def test_a_group_keeps_what_kind_of_refusal_it_is() -> None:
    assert reason_group("device 'dev-1' is not registered") == "device '…' is not registered"
    assert reason_group("conflicting duplicate") == "conflicting duplicate"
    msgspec_reason = "invalid reading: Expected `float`, got `str` - at `$.readings[3].power_kw`"
    assert reason_group(msgspec_reason) == (
        "invalid reading: Expected `float`, got `str` - at `$.readings[<n>].power_kw`"
    )
    assert reason_group("device 'a' is not registered") != reason_group(
        "device 'a' belongs to another site than 'b'"
    )


def test_letters_are_named_topic_partition_offset_with_or_without_the_namespace() -> None:
    assert parse_ref("telemetry.dlq:3:1207") == ("telemetry.dlq", 3, 1207)
    assert parse_ref("ns.alerts.dlq:0:5", "ns.") == ("alerts.dlq", 0, 5)
    for bad in ("telemetry.dlq", "telemetry.dlq:a:1", "telemetry.dlq:1:-1", "telemetry.dlq::1"):
        with pytest.raises(DlqError, match="TOPIC:PARTITION:OFFSET"):
            parse_ref(bad)
    with pytest.raises(DlqError, match=r"unknown dead-letter topic 'telemetry\.raw'"):
        parse_ref("telemetry.raw:0:1")


def test_a_selection_matches_a_reason_in_any_case_and_letters_since_a_time() -> None:
    since = datetime.fromtimestamp(2, UTC)
    sel = Selection(reason="DEV-1' IS NOT", since=since)
    assert sel.matches(letter(reason="device 'dev-1' is not registered", ts_ms=2_000))
    assert not sel.matches(letter(reason="device 'dev-1' is not registered", ts_ms=1_999))
    assert not sel.matches(letter(reason="device 'dev-2' is not registered", ts_ms=3_000))


def test_a_listing_counts_everything_and_keeps_the_newest() -> None:
    listing = Listing()
    for i in range(10):
        listing.add(letter(reason=f"device 'dev-{i}' is not registered", ts_ms=i, offset=i), "t", 3)
    assert listing.letters == 10
    [count] = listing.counts.values()
    assert count.count == 10 and count.example == "device 'dev-0' is not registered"
    assert [x.offset for x in listing.shown()] == [7, 8, 9]


def test_a_redriven_record_says_how_often_and_where_from() -> None:
    first = redrive_headers(letter())
    assert first == [
        (Headers.REDRIVE_COUNT, b"1"),
        (Headers.REDRIVEN_FROM, b"ns.telemetry.dlq:3:7"),
    ]
    assert redrive_headers(letter(count=b"2"))[0] == (Headers.REDRIVE_COUNT, b"3")
    assert letter(count=b"junk").redrive_count == 0
    assert letter().redrive_count is None


def test_a_single_reading_from_telemetry_valid_goes_back_as_a_batch_of_one() -> None:
    reading = (
        b'{"device_id":"dev-1","site_id":"s","device_type":"meter","ts":"2026-11-30T08:00:00Z"}'
    )
    sent = redrive_value(letter(reading, source=VALID), VALID)
    assert sent == b'{"readings":[' + reading + b"]}"
    assert json.loads(sent or b"") == {"readings": [json.loads(reading)]}
    batch = b'{"readings":[' + reading + b"]}"
    assert redrive_value(letter(batch, source=VALID), VALID) == batch  # the alerter's letters
    assert redrive_value(letter(b"not json", source=VALID), VALID) == b"not json"
    assert redrive_value(letter(reading), VALID) == reading  # telemetry.raw takes one reading
    assert redrive_value(letter(None, source=VALID), VALID) is None


def test_dead_letter_headers_carry_the_source_records_redrive_count() -> None:
    assert redrive_count([]) is None
    assert redrive_count([("x-source-offset", b"4"), (Headers.REDRIVE_COUNT, b"2")]) == b"2"
    # a device with a Kafka client writes its own headers: only a count is passed on
    for forged in (b"\x00\xff", b"-1", b"2 ", b"1234567", b""):
        assert redrive_count([(Headers.REDRIVE_COUNT, forged)]) is None
    plain = dict(dlq_headers("why", "stage", "topic", 1, 2))
    assert Headers.REDRIVE_COUNT not in plain
    counted = dict(dlq_headers("why", "stage", "topic", 1, 2, b"2"))
    assert counted[Headers.REDRIVE_COUNT] == b"2"


def test_values_and_names_are_shown_safely() -> None:
    what, lines = render_value(b'{"a": [1, 2]}')
    assert what == "13 bytes, JSON" and lines[0] == "{"
    what, lines = render_value(b"\x00\xff\x10abc")
    assert what == "6 bytes, binary" and lines[0].startswith("00000000  00 ff 10 61 62 63")
    what, lines = render_value(b"plain \x1b[31mred")
    assert what.endswith("text (not JSON)") and "\x1b" not in lines[0]
    assert render_value(None)[0] == "none (a tombstone)"
    assert safe("dev\u202e1") == "dev\\u202e1"
    assert Namespace(Settings(kafka_namespace="ns."))("ns.telemetry.dlq") == "telemetry.dlq"
