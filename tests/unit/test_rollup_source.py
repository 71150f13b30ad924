"""Which rows a readings request reads (`query_api.devices.series_query`): raw readings for
short ranges and fine buckets, rollups for the rest, their buckets whole and at most `points`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from query_api.devices import MAX_POINTS, MAX_SPAN, SeriesQuery, series_query

NOW = datetime(2026, 3, 10, 12, 34, 56, 789_000, tzinfo=UTC)
RAW = timedelta(days=30)
M1 = timedelta(days=90)


def query(start: datetime, end: datetime, points: int = 300) -> SeriesQuery:
    return series_query(
        "dev-1", start, end, points, ["power_kw"], now=NOW, raw_retention=RAW, m1_retention=M1
    )


def test_an_hour_reads_raw_readings_from_the_start_given() -> None:
    q = query(NOW - timedelta(hours=1), NOW)
    assert (q.source, q.start, q.end, q.bucket_s) == ("raw", NOW - timedelta(hours=1), NOW, 12)
    assert "FROM telemetry_readings" in q.sql
    one = query(NOW - timedelta(seconds=120), NOW, points=1)  # a bucket of 2 min: still raw
    assert (one.source, one.bucket_s) == ("raw", 120)
    hour = query(NOW - timedelta(hours=1), NOW, points=1)  # a bucket of an hour: still raw
    assert (hour.source, hour.start, hour.bucket_s) == ("raw", NOW - timedelta(hours=1), 3600)


def test_a_day_reads_minute_rollups_over_whole_minutes() -> None:
    q = query(NOW - timedelta(days=1), NOW)
    assert q.source == "1m" and "FROM telemetry_rollup_1m" in q.sql
    assert q.start == datetime(2026, 3, 9, 12, 34, tzinfo=UTC)
    assert q.end == datetime(2026, 3, 10, 12, 35, tzinfo=UTC)
    assert q.bucket_s == 300  # 86,460 s / 300 points, rounded up to whole minutes


def test_a_month_reads_hour_rollups_over_whole_hours() -> None:
    q = query(NOW - timedelta(days=30), NOW)
    assert q.source == "1h" and "FROM telemetry_rollup_1h" in q.sql
    assert (q.start, q.end) == (
        datetime(2026, 2, 8, 12, tzinfo=UTC),
        datetime(2026, 3, 10, 13, tzinfo=UTC),
    )
    assert q.bucket_s == 3 * 3600
    assert q.params == (q.bucket_s, q.start, "dev-1", q.start, q.end)


def test_a_range_past_a_retention_reads_the_rollups_kept_longer() -> None:
    old = NOW - RAW - timedelta(hours=2)
    assert query(old, old + timedelta(minutes=10)).source == "1m"
    older = NOW - M1 - timedelta(hours=2)
    q = query(older, older + timedelta(minutes=10))
    assert (q.source, q.bucket_s) == ("1h", 3600)


@given(
    start=st.datetimes(
        min_value=datetime(2025, 1, 1), max_value=datetime(2026, 3, 10), timezones=st.just(UTC)
    ),
    span_s=st.integers(min_value=1, max_value=int(MAX_SPAN.total_seconds())),
    points=st.integers(min_value=1, max_value=MAX_POINTS),
)
def test_a_series_covers_the_range_in_at_most_points_whole_buckets(
    start: datetime, span_s: int, points: int
) -> None:
    end = start + timedelta(seconds=span_s)
    q = query(start, end, points)
    assert q.start <= start and end <= q.end
    buckets = -(-(q.end - q.start).total_seconds() // q.bucket_s)
    assert 1 <= buckets <= points
    if q.source == "raw":
        assert (q.start, q.end) == (start, end)
        assert span_s <= 3600 or q.bucket_s < 60
        return
    step = 60 if q.source == "1m" else 3600
    assert q.bucket_s % step == 0
    for t in (q.start, q.end):
        assert t.timestamp() % step == 0
    assert q.end - q.start < end - start + timedelta(seconds=2 * step)
