"""`microgrid replay`: a time range of a topic, written to JSON lines, CSV or Parquet, equals what
PostgreSQL stored for that range: each reading identity once (repeats and a conflicting repeat
left out, the first kept), readings that came late included, `--from` included and `--to` not,
and only the site or device asked for."""

from __future__ import annotations

import asyncio
import csv
import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pyarrow.parquet as pq
import pytest

from contracts import METRICS
from runtime.keys import create_key
from runtime.settings import Settings
from runtime.tabular import READING_COLUMNS
from tests.conftest import Components, wait_for
from tests.e2e.test_ingest_kafka import produce
from tests.support import microgrid_cli, new_device

NAMES = [c.name for c in READING_COLUMNS]
OVER_TEMPERATURE = "00000000-0000-4000-8000-000000000002"  # a default rule: > 75 for 10 s
PER_DEVICE = 60


def post(platform: Components, key: str, readings: list[dict[str, Any]]) -> None:
    r = httpx.post(
        f"{platform.gateway_url}/api/v1/telemetry/batch",
        json={"readings": readings},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert r.status_code == 202, r.text


def body(device: str, site: str, device_type: str, ts: datetime, seq: int) -> dict[str, Any]:
    metrics: dict[str, Any] = {
        "power_kw": round(random.uniform(-40, 40), 4),
        "voltage_v": round(random.uniform(225, 235), 3),
        "temperature_c": round(random.uniform(30, 40), 2),
    }
    if device_type == "battery":
        metrics["soc_pct"] = round(random.uniform(40, 60), 3)
    return {
        "device_id": device,
        "site_id": site,
        "device_type": device_type,
        "ts": ts.isoformat(),
        "seq": seq,
        **metrics,
    }


class Sent:
    """Readings of three devices of one site, all written two hours after their time (late):
    one second apart, a repeat of a device's first readings, a repeat of one identity with
    other values, and readings of another site at the same times."""

    def __init__(self, platform: Components, db: psycopg.Connection) -> None:
        self.site = f"site-{new_device()}"
        self.other_site = f"site-{new_device()}"
        self.key = key = create_key(db, self.site)
        other_key = create_key(db, self.other_site)
        self.base = (datetime.now(UTC) - timedelta(hours=2)).replace(microsecond=0)
        types = ("battery", "pv_inverter", "genset")
        self.devices = [new_device() for _ in types]
        self.other = new_device()
        sent = {
            d: [body(d, self.site, t, self.at(i), i) for i in range(PER_DEVICE)]
            for d, t in zip(self.devices, types, strict=True)
        }
        # the genset runs hot for 15 s: an over-temperature alert opens and clears
        for i in range(20, 36):
            sent[self.devices[2]][i]["temperature_c"] = 80.0
        for d in self.devices:
            post(platform, key, sent[d][: PER_DEVICE - 1])
        post(platform, key, sent[self.devices[0]][:10])  # a client's retry: the same values
        conflict = dict(sent[self.devices[1]][20], power_kw=99.5)
        post(platform, key, [conflict])  # the same identity with other values
        post(platform, other_key, [body(self.other, self.other_site, "load", self.at(15), 1)])
        for d in self.devices:  # each device's last: stored, it proves the ones before are
            post(platform, key, sent[d][PER_DEVICE - 1 :])
        wait_for(
            lambda: stored(db, self.devices) == 3 * PER_DEVICE,
            60,
            "the site's readings in PostgreSQL",
        )

    def at(self, i: int) -> datetime:
        return self.base + timedelta(seconds=i)


def stored(db: psycopg.Connection, devices: list[str]) -> int:
    row = db.execute(
        "SELECT count(*) FROM telemetry_readings WHERE device_id = ANY(%s)", (devices,)
    ).fetchone()
    assert row is not None
    return int(row[0])


def expected(
    db: psycopg.Connection, start: datetime, end: datetime, site: str, device: str | None = None
) -> list[tuple[Any, ...]]:
    metrics = ", ".join(f"r.{m}" for m in METRICS)
    rows = db.execute(
        f"SELECT r.device_id, d.site_id, d.device_type, r.ts, r.seq, {metrics}"
        " FROM telemetry_readings r JOIN devices d USING (device_id)"
        " WHERE d.site_id = %s AND r.ts >= %s AND r.ts < %s"
        " AND (%s::text IS NULL OR r.device_id = %s)",
        (site, start, end, device, device),
    ).fetchall()
    return sorted((*row[:3], row[3].astimezone(UTC), *row[4:]) for row in rows)


def read_rows(path: Path) -> list[tuple[Any, ...]]:
    """The file's rows as tuples in column order, typed, sorted."""
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        assert table.column_names == NAMES
        return sorted(tuple(r[n] for n in NAMES) for r in table.to_pylist())
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            reader = csv.reader(f)
            assert next(reader) == NAMES
            return sorted(
                tuple(typed(n, v or None) for n, v in zip(NAMES, row, strict=True))
                for row in reader
            )
    lines = path.read_text().splitlines()
    return sorted(tuple(typed(n, json.loads(line).get(n)) for n in NAMES) for line in lines)


def typed(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name == "ts":
        return datetime.fromisoformat(value).astimezone(UTC)
    if name == "seq":
        return int(value)
    if name in METRICS:
        return float(value)
    return value


def replay(topic: str, start: datetime, end: datetime, out: Path, **options: str) -> str:
    """`microgrid replay` of the range to `out`, with `--NAME VALUE` for each option; its
    summary."""
    args = ["--topic", topic, "--from", start.isoformat(), "--to", end.isoformat()]
    for name, value in options.items():
        args += [f"--{name}", value]
    done = microgrid_cli("replay", *args, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return done.stderr


@pytest.fixture(scope="module")
def sent(platform: Components, stack: Settings) -> Sent:
    with psycopg.connect(stack.database_url, autocommit=True) as db:
        return Sent(platform, db)


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_replay_of_a_range_equals_postgresql(
    sent: Sent, db: psycopg.Connection, tmp_path: Path, suffix: str
) -> None:
    start, end = sent.at(10), sent.at(40)  # readings 10 (at --from) to 39; 40 is at --to
    out = tmp_path / f"range{suffix}"
    log = replay("telemetry.valid", start, end, out, site=sent.site)
    rows = read_rows(out)
    want = expected(db, start, end, sent.site)
    assert len(want) == 3 * 30
    assert rows == want  # identities and every value, the first of a conflicting repeat
    assert len({(r[0], r[3]) for r in rows}) == len(rows)
    assert {r[3] for r in rows} == {sent.at(i) for i in range(10, 40)}
    assert "repeated identities left out" in log  # the retry and the conflicting repeat
    assert not (tmp_path / f"range{suffix}.partial").exists()


def test_the_export_route_gives_the_rows_replay_gives(
    sent: Sent, platform: Components, tokens: dict[str, str], tmp_path: Path
) -> None:
    start, end = sent.at(5), sent.at(50)
    replayed = tmp_path / "replayed.parquet"
    replay("telemetry.valid", start, end, replayed, site=sent.site)
    r = httpx.get(
        f"{platform.api_url}/api/v1/readings/export",
        params={
            "from": start.isoformat(),
            "to": end.isoformat(),
            "site_id": sent.site,
            "format": "parquet",
        },
        headers={"Authorization": f"Bearer {tokens['viewer']}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    exported = tmp_path / "exported.parquet"
    exported.write_bytes(r.content)
    assert pq.read_schema(exported) == pq.read_schema(replayed)
    assert read_rows(exported) == read_rows(replayed)
    assert len(read_rows(replayed)) == 3 * 45


def test_replay_of_one_device_and_of_the_raw_topic(
    sent: Sent, db: psycopg.Connection, tmp_path: Path
) -> None:
    start, end = sent.at(0), sent.at(PER_DEVICE)
    device = sent.devices[0]
    out = tmp_path / "device.parquet"
    replay("telemetry.valid", start, end, out, device=device)
    assert read_rows(out) == expected(db, start, end, sent.site, device)
    raw = tmp_path / "raw.csv"
    replay("telemetry.raw", start, end, raw, site=sent.site)
    assert read_rows(raw) == expected(db, start, end, sent.site)


def test_a_raw_replay_leaves_out_what_the_validator_refused(
    sent: Sent, platform: Components, stack: Settings, db: psycopg.Connection, tmp_path: Path
) -> None:
    """Records straight on telemetry.raw that the validator refuses (a key that is not the
    device's, a reading too old when it was written) are left out of a raw replay, so it still
    equals what was stored."""
    device = sent.devices[0]
    late = body(device, sent.site, "battery", sent.at(70), 70)
    too_old = body(device, sent.site, "battery", sent.at(71) - timedelta(days=30), 71)
    wrong_key = json.dumps(body(device, sent.site, "battery", sent.at(72), 72)).encode()
    refused = [(b"wrong", wrong_key), (device.encode(), json.dumps(too_old).encode())]
    asyncio.run(produce(stack, refused))  # in the log before the replay starts
    r = httpx.post(
        f"{platform.gateway_url}/api/v1/telemetry",
        json=late,
        headers={"Authorization": f"Bearer {sent.key}"},
        timeout=10,
    )
    assert r.status_code == 202, r.text
    wait_for(lambda: stored(db, [device]) == PER_DEVICE + 1, 60, "the late reading stored")
    start, end = sent.at(0) - timedelta(days=31), sent.at(80)
    out = tmp_path / "raw.parquet"
    log = replay("telemetry.raw", start, end, out, site=sent.site)
    rows = read_rows(out)
    assert rows == expected(db, start, end, sent.site)
    mine = [r for r in rows if r[0] == device]
    assert len(mine) == PER_DEVICE + 1 and mine[-1][3] == sent.at(70)
    assert "records without a valid reading skipped" in log


def test_a_lateness_shorter_than_the_readings_misses_them(sent: Sent, tmp_path: Path) -> None:
    """The readings were written two hours after their time: a replay told that nothing came
    more than a minute late stops reading the log before them."""
    out = tmp_path / "late.jsonl"
    replay("telemetry.valid", sent.at(0), sent.at(PER_DEVICE), out, site=sent.site, lateness="1m")
    assert out.read_text() == ""
    everything = tmp_path / "all.jsonl"
    replay(
        "telemetry.valid",
        sent.at(0),
        sent.at(PER_DEVICE),
        everything,
        site=sent.site,
        lateness="3h",
    )
    assert len(everything.read_text().splitlines()) == 3 * PER_DEVICE


def test_replay_of_alert_events_matches_the_alerts_table(
    sent: Sent, db: psycopg.Connection, tmp_path: Path
) -> None:
    hot = sent.devices[2]
    wait_for(
        lambda: db.execute(
            "SELECT 1 FROM alerts WHERE device_id = %s AND rule_id = %s AND cleared_at IS NOT NULL",
            (hot, OVER_TEMPERATURE),
        ).fetchone(),
        60,
        "the over-temperature alert to open and clear",
    )
    start, end = sent.at(0), sent.at(PER_DEVICE)
    out = tmp_path / "alerts.parquet"
    replay("alerts", start, end, out, site=sent.site)
    events = {(e["alert_id"], e["kind"], e["at"]) for e in pq.read_table(out).to_pylist()}
    alerts = db.execute(
        "SELECT id, opened_at, cleared_at FROM alerts WHERE site_id = %s", (sent.site,)
    ).fetchall()
    want = {
        (a, "opened", opened.astimezone(UTC)) for a, opened, _ in alerts if start <= opened < end
    }
    want |= {(a, "cleared", c.astimezone(UTC)) for a, _, c in alerts if c and start <= c < end}
    assert ("cleared" in {kind for _, kind, _ in want}) and events == want


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--topic", "telemetry.dlq", "--from", "1h"], "cannot replay topic"),
        (["--topic", "alerts", "--from", "1h", "--to", "2h"], "empty range"),
        (["--topic", "alerts", "--from", "yesterday"], "is not a time"),
        (["--topic", "alerts", "--from", "2026-11-30T08:00:00"], "no UTC offset"),
    ],
)
def test_a_bad_replay_says_why_and_writes_nothing(
    stack: Settings, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "x.parquet"
    done = microgrid_cli("replay", *args, "--out", str(out))
    assert done.returncode != 0
    assert message in done.stderr
    assert not out.exists()


def test_a_replay_does_not_replace_a_file_unless_told(stack: Settings, tmp_path: Path) -> None:
    out = tmp_path / "kept.csv"
    out.write_text("mine\n")
    done = microgrid_cli("replay", "--topic", "alerts", "--from", "1h", "--out", str(out))
    assert done.returncode != 0 and "--force" in done.stderr
    assert out.read_text() == "mine\n"
    forced = microgrid_cli(
        "replay",
        "--topic",
        "alerts",
        "--from",
        "1m",
        "--site",
        "none",
        "--out",
        str(out),
        "--force",
    )
    assert forced.returncode == 0, forced.stderr
    assert out.read_text().startswith("alert_id,kind,")
