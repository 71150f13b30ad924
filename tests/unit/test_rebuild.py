"""What a rebuild carries over from the live tables: only what the log can no longer restore."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from aiokafka import TopicPartition

from microgrid.rebuild import MODELS, _cutoff
from runtime.settings import Settings

NOW = datetime(2026, 11, 30, 12, 34, 56, tzinfo=UTC)


def begins(*offsets: int) -> dict[TopicPartition, int]:
    return {TopicPartition("telemetry.valid", p): o for p, o in enumerate(offsets)}


def test_nothing_is_carried_over_while_the_log_holds_everything() -> None:
    s = Settings()
    assert _cutoff(s, MODELS["telemetry"], begins(0, 0, 0), NOW) is None


def test_once_the_log_lost_records_the_cutoff_is_where_retention_cannot_have_reached() -> None:
    s = Settings(telemetry_retention_hours=168, dlq_retention_hours=720, max_future_skew_s=300)
    cutoff = _cutoff(s, MODELS["telemetry"], begins(0, 12, 0), NOW)
    # records younger than the retention are all there; a reading is written at most the
    # future skew before its time; an hour of margin; rounded up to the hour (rollup buckets)
    earliest = NOW - timedelta(hours=168) + timedelta(seconds=300) + timedelta(hours=1)
    assert cutoff == datetime(2026, 11, 23, 14, 0, tzinfo=UTC)
    assert earliest <= cutoff < earliest + timedelta(hours=1)
    # alerts and control events are kept as long as dead letters
    alerts = _cutoff(s, MODELS["alerts"], begins(3), NOW)
    assert alerts == datetime(2026, 10, 31, 14, 0, tzinfo=UTC)


def test_a_cutoff_on_the_hour_stays_there() -> None:
    s = Settings(telemetry_retention_hours=168, max_future_skew_s=0)
    on_the_hour = datetime(2026, 11, 30, 11, 0, tzinfo=UTC)
    assert _cutoff(s, MODELS["rollups"], begins(1), on_the_hour) == datetime(
        2026, 11, 23, 12, 0, tzinfo=UTC
    )
