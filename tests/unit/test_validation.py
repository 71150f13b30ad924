"""The validator's pure core and the reading contract, without any service."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from contracts import Reading, ReadingBatch, TimeWindow, check_time_window
from stream_processors.validation import Invalid, Valid, validate_record

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
WINDOW = TimeWindow(max_future=timedelta(minutes=5), max_age=timedelta(days=7))


def enc(**fields: object) -> bytes:
    base: dict[str, object] = {
        "device_id": "inv-1",
        "site_id": "site-1",
        "device_type": "pv_inverter",
        "ts": "2026-11-27T11:59:00Z",
    }
    base.update(fields)
    return msgspec.json.encode(base)


def test_single_reading_is_normalized_to_a_batch() -> None:
    verdict = validate_record(b"inv-1", enc(power_kw=4.2, seq=3), NOW, WINDOW)
    assert isinstance(verdict, Valid)
    assert verdict.device_id == "inv-1"
    batch = msgspec.json.decode(verdict.value, type=ReadingBatch)
    assert [(r.power_kw, r.seq) for r in batch.readings] == [(4.2, 3)]


def test_batch_of_one_device_is_valid() -> None:
    value = b'{"readings": [' + enc(seq=1) + b"," + enc(seq=2) + b"]}"
    verdict = validate_record(b"inv-1", value, NOW, WINDOW)
    assert isinstance(verdict, Valid) and verdict.count == 2


def test_site_named_readings_is_still_a_single_reading() -> None:
    assert isinstance(validate_record(b"inv-1", enc(site_id="readings"), NOW, WINDOW), Valid)


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        (b"inv-1", b"", "empty"),
        (b"inv-1", b"\x00\x01garbage", "malformed JSON"),
        (b"inv-1", enc(soc_pct=101), "soc_pct"),
        (b"inv-1", enc(device_type="fridge"), "device_type"),
        (b"inv-1", enc(ts="2026-11-27T11:59:00"), "timezone"),
        (b"inv-1", enc(colour="red"), "unknown field"),
        (b"other", enc(), "not the readings' device id"),
        (None, enc(), "without a key"),
        (b"inv-1", enc(ts="2026-11-27T12:30:00Z"), "in the future"),
        (b"inv-1", enc(ts="2026-11-01T00:00:00Z"), "older than"),
        (None, b'{"readings": [' + enc() + b"," + enc(device_id="inv-2") + b"]}", "several"),
        (None, b'{"readings": []}', "length >= 1"),
    ],
)
def test_bad_records_get_a_reason(key: bytes | None, value: bytes, reason: str) -> None:
    verdict = validate_record(key, value, NOW, WINDOW)
    assert isinstance(verdict, Invalid)
    assert reason in verdict.reason


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(value: bytes) -> None:
    assert isinstance(validate_record(b"k", value, NOW, WINDOW), (Valid, Invalid))


@given(
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["soc_pct", "frequency_hz", "voltage_v"]),
)
def test_physical_ranges_are_enforced_at_decode(value: float, metric: str) -> None:
    limits = {"soc_pct": (0, 100), "frequency_hz": (40, 70), "voltage_v": (0, 50_000)}
    low, high = limits[metric]
    verdict = validate_record(b"inv-1", enc(**{metric: value}), NOW, WINDOW)
    assert isinstance(verdict, Valid) == (low <= value <= high)


def test_time_window_edges() -> None:
    r = msgspec.json.decode(enc(), type=Reading)
    assert check_time_window(r, NOW, WINDOW) is None
    assert check_time_window(r, NOW - timedelta(minutes=7), WINDOW) is not None
    assert check_time_window(r, NOW + timedelta(days=8), WINDOW) is not None
