"""The read models hold every metric of the reading contract: a metric added to `Reading` without
its migration fails here, not in the projector."""

from __future__ import annotations

import psycopg

from contracts import METRICS


def test_every_metric_has_its_column_in_the_readings_and_latest_tables(
    db: psycopg.Connection,
) -> None:
    for table in ("telemetry_readings", "device_latest"):
        rows = db.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = %s",
            (table,),
        ).fetchall()
        columns: dict[str, str] = dict(rows)
        missing = [m for m in METRICS if columns.get(m) != "double precision"]
        assert missing == [], f"{table} lacks a double precision column for {missing}"
