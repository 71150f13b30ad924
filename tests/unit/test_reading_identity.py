"""The projection's choice within one poll: the first reading of each identity in log order,
repeats with the same values counted, repeats with other values set aside with their record."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from contracts import Reading
from projections.telemetry import Source, first_of_each_identity

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def r(device: str, ts: datetime, power: float, seq: int = 1) -> Reading:
    return Reading(device, "site-1", "battery", ts, seq=seq, power_kw=power)


def test_first_in_log_order_wins_and_repeats_are_told_from_conflicts() -> None:
    a, b = r("d1", T0, 1.0), r("d1", T0 + timedelta(seconds=1), 2.0)
    same_a = r("d1", T0, 1.0)
    other_a = r("d1", T0, 5.0)
    other_seq_b = r("d1", T0 + timedelta(seconds=1), 2.0, seq=9)
    first = Source(0, 10, [a, b])
    second = Source(0, 11, [same_a, other_a, other_seq_b])
    fresh, repeats, conflicts = first_of_each_identity([first, second])
    assert fresh == [a, b]
    assert repeats == 1
    assert conflicts == [(second, other_a), (second, other_seq_b)]


def test_the_identity_is_the_instant_whatever_the_offset_it_is_written_in() -> None:
    utc = r("d1", T0, 1.0)
    cet = r("d1", T0.astimezone(timezone(timedelta(hours=1))), 1.0)
    other_device = r("d2", T0, 1.0)
    fresh, repeats, conflicts = first_of_each_identity([Source(3, 1, [utc, cet, other_device])])
    assert fresh == [utc, other_device]
    assert (repeats, conflicts) == (1, [])
