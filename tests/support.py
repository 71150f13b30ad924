"""Helpers shared by the integration and end-to-end tests."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg


def reading(device_id: str, site_id: str, seq: int = 0, **metrics: Any) -> dict[str, Any]:
    ts = datetime.now(UTC) - timedelta(seconds=1) + timedelta(microseconds=seq)
    body: dict[str, Any] = {
        "device_id": device_id,
        "site_id": site_id,
        "device_type": "battery",
        "ts": ts.isoformat(),
        "seq": seq,
        "soc_pct": 50.0,
        "power_kw": 1.5,
    }
    body.update(metrics)
    return body


def new_device() -> str:
    return f"dev-{uuid.uuid4().hex[:10]}"


def stored_count(db: psycopg.Connection, device_ids: list[str]) -> tuple[int, int]:
    """(rows, distinct (device, seq)) in telemetry_readings for these devices."""
    row = db.execute(
        "SELECT count(*), count(DISTINCT (device_id, seq)) FROM telemetry_readings"
        " WHERE device_id = ANY(%s)",
        (device_ids,),
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])
