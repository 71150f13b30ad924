"""The load generators' readings: every one a distinct identity `(device_id, ts)`, with a `ts`
the gateway accepts; and the overload probe's bookkeeping of what it sent."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from benchmarks.harness import Load
from benchmarks.ingest_probe import Sent, batch_body, status_label
from benchmarks.profiles import PROFILES, Profile
from benchmarks.stamps import Stamps, datetime_us
from contracts import Reading
from runtime.settings import Settings

SETTINGS = Settings()


@pytest.mark.parametrize(
    "profile",
    [
        PROFILES["baseline"],
        PROFILES["stress"],
        Profile("one device", "batch", 1000, batch=1000, devices_per_batch=1),
        Profile("uneven", "batch", 1000, batch=7, devices_per_batch=3),
    ],
    ids=lambda p: p.name,
)
def test_every_reading_of_a_run_has_its_own_identity_and_an_accepted_ts(profile: Profile) -> None:
    load = Load("run1", profile, "site-1")
    before = datetime.now(UTC)
    batches = [load.readings() for _ in range(300)]
    after = datetime.now(UTC)
    readings = [r for batch in batches for r in batch]
    identities = {(r["device_id"], r["ts"]) for r in readings}
    assert len(identities) == len(readings)
    assert len({(r["device_id"], r["seq"]) for r in readings}) == len(readings)
    decoded = [msgspec.json.decode(msgspec.json.encode(r), type=Reading) for r in readings]
    # distinct as instants too (not only as texts), increasing per device in the order made
    assert len({(r.device_id, r.ts) for r in decoded}) == len(readings)
    last: dict[str, datetime] = {}
    for r in decoded:
        assert r.device_id not in last or r.ts > last[r.device_id]
        last[r.device_id] = r.ts
    # not before the run started (the harness counts rows with ts >= its start), never ahead
    # of the clock by more than the readings made (one microsecond each)
    ahead = timedelta(microseconds=len(readings))
    assert all(before <= r.ts <= after + ahead for r in decoded)
    assert all(r.ts <= after + timedelta(seconds=SETTINGS.max_future_skew_s) for r in decoded)


def test_stamps_never_go_back_even_when_the_clock_does() -> None:
    clock = iter([5_000_000_000, 5_000_000_000, 4_000_000_000, 9_000_000_000])
    stamps = Stamps(lambda: next(clock))
    assert stamps.take(3) == 5_000_000
    assert stamps.take(2) == 5_000_003  # same clock reading: after the last one given out
    assert stamps.take(1) == 5_000_005  # the clock went back
    assert stamps.take(1) == 9_000_000  # the clock is ahead again: take it


def test_stamp_texts_are_rfc3339_microseconds_across_second_and_millisecond_edges() -> None:
    stamps = Stamps()
    first = datetime_us(datetime(2026, 12, 31, 23, 59, 59, 998_500, tzinfo=UTC))
    texts = stamps.isos(first, 3000)
    assert texts[0] == "2026-12-31T23:59:59.998500+00:00"
    assert texts[1500] == "2027-01-01T00:00:00.000000+00:00"
    assert [datetime_us(datetime.fromisoformat(t)) for t in texts] == list(
        range(first, first + 3000)
    )
    assert stamps.iso(first + 499) == "2026-12-31T23:59:59.998999+00:00"


def test_stamps_follow_the_clock() -> None:
    stamps = Stamps()
    first = stamps.take(1)
    assert abs(first / 1e6 - time.time()) < 1.0
    assert stamps.ahead_s() < 1.0


def test_probe_batches_carry_distinct_identities_and_find_their_batch() -> None:
    stamps, sent = Stamps(), Sent("r1", devices=3)
    bodies = []
    for client in (0, 1, 0):
        batch, body = batch_body(stamps, sent, client, "probe-r1", 7)
        bodies.append((batch, msgspec.json.decode(body)["readings"]))
    sent.answer(0, 202)
    sent.answer(1, 503)
    sent.answer(2, 0)
    readings = [r for _, rs in bodies for r in rs]
    identities = [(r["device_id"], datetime_us(datetime.fromisoformat(r["ts"]))) for r in readings]
    assert len(set(identities)) == len(readings) == sent.readings == 21
    assert sent.distinct_identities() == 21
    assert {r["device_id"] for r in bodies[0][1]} == {f"probe-r1-0-{d}" for d in range(3)}
    assert {r["device_id"] for r in bodies[1][1]} == {f"probe-r1-1-{d}" for d in range(3)}
    for batch, rs in bodies:
        for r in rs:
            us = datetime_us(datetime.fromisoformat(r["ts"]))
            assert sent.batch_of(r["device_id"], us) == batch
    assert sent.readings_by_answer() == {"202": 7, "503": 7, "429": 0, "other": 7}
    # a wrong device or a ts no batch sent is no identity of the run
    device, us = identities[0]
    assert sent.batch_of("probe-r1-0-9", us) is None
    assert sent.batch_of(device, us - 1) is None
    assert sent.batch_of(device, identities[-1][1] + 1) is None

    # PostgreSQL holds the 202 batch, two readings of the refused one, and one row twice
    stored = [*identities[:7], identities[7], identities[8], identities[0], (device, 1)]
    c = sent.compare(stored)
    assert (c.rows, c.duplicates, c.unknown) == (11, 1, 1)
    assert c.by_answer == {"202": 7, "503": 2}
    assert c.refused_but_stored == 2


def test_distinct_identities_count_overlapping_ranges_once() -> None:
    sent = Sent("r", devices=1, firsts=[10, 12, 30], sizes=[5, 5, 1], clients=[0, 0, 0])
    sent.finals = [202, 202, 202]
    assert sent.distinct_identities() == 7 + 1


def test_status_labels() -> None:
    assert status_label(202, b"") == "202"
    assert status_label(0, b"") == "timeout/connection error"
    assert status_label(503, b'{"status":503,"outcome":"unknown"}') == "503 (unknown)"
    assert status_label(429, b'{"outcome":"not stored"}') == "429 (not stored)"
    assert status_label(503, b'{"status":503}') == "503"
    assert status_label(503, b"not json") == "503"
