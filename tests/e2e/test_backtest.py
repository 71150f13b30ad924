"""`microgrid backtest`: over a simulated hour of readings sent through the gateway, back-testing
the default threshold rules and a rate-of-change rule (as the API answers them, so with their
ids) yields exactly the alerts the live alerter raised; an offline rule's alerts differ only as
the README says (live ticks on the wall clock); two runs give the same output; bad arguments
exit 1 with the reason; and a backtest leaves no trace."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from runtime.keys import create_key
from runtime.settings import Settings
from stream_processors.alerter import TICK_S
from stream_processors.alerting import alert_id
from tests.conftest import Components, wait_for
from tests.support import microgrid_cli, new_device

DEFAULTS = {  # runtime/migrations/003_default_alert_rules.sql
    "soc": "00000000-0000-4000-8000-000000000001",
    "hot": "00000000-0000-4000-8000-000000000002",
    "frequency": "00000000-0000-4000-8000-000000000003",
    "voltage": "00000000-0000-4000-8000-000000000004",
}
STEP_S = 10  # a reading every 10 s per device
# how much later than the moment silence became due the live alerter may open an offline alert
# for a device whose readings come on time: its tick interval, plus slack for a busy machine
TICK_SLACK_S = TICK_S + 2.0

Alert = tuple[str, str, datetime, datetime | None]  # id, device, opened, cleared


def api(platform: Components, token: str, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(
        method,
        f"{platform.api_url}{path}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
        **kw,
    )


def register(platform: Components, tokens: dict[str, str], spec: dict[str, Any]) -> dict[str, Any]:
    """A new rule, once the alerter has it; the rule as GET /api/v1/alert-rules/{id} answers."""
    r = api(platform, tokens["admin"], "POST", "/api/v1/alert-rules", json=spec)
    assert r.status_code == 201, r.text
    rule_id = r.json()["id"]
    log = platform.log_dir / "alerter.log"
    wait_for(lambda: f"rule {rule_id} (" in log.read_text(errors="replace"), 30, "the rule")
    answered = api(platform, tokens["viewer"], "GET", f"/api/v1/alert-rules/{rule_id}")
    assert answered.status_code == 200, answered.text
    return dict(answered.json())


def post(platform: Components, key: str, readings: list[dict[str, Any]]) -> None:
    r = httpx.post(
        f"{platform.gateway_url}/api/v1/telemetry/batch",
        json={"readings": readings},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )
    assert r.status_code == 202, r.text


def live_alerts(db: psycopg.Connection, rule_id: str) -> set[Alert]:
    rows = db.execute(
        "SELECT id, device_id, opened_at, cleared_at FROM alerts WHERE rule_id = %s", (rule_id,)
    ).fetchall()
    return {(i, d, o.astimezone(UTC), c and c.astimezone(UTC)) for i, d, o, c in rows}


def backtest(
    rule: dict[str, Any], tmp_path: Path, start: datetime, end: datetime | str, *extra: str
) -> dict[str, Any]:
    path = tmp_path / f"rule-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps(rule))
    to = end if isinstance(end, str) else end.isoformat()
    done = microgrid_cli(
        "backtest", "--rule", str(path), "--from", start.isoformat(), "--to", to, "--json", *extra
    )
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


def alerts_of(report: dict[str, Any]) -> set[Alert]:
    def t(text: str) -> datetime:
        return datetime.fromisoformat(text).astimezone(UTC)

    return {
        (a["alert_id"], a["device_id"], t(a["opened_at"]), a["cleared_at"] and t(a["cleared_at"]))
        for a in report["alerts"]
    }


def hour_of(
    device: str, site: str, device_type: str, shift: int, base: datetime, n: int
) -> list[dict[str, Any]]:
    """A device's readings every STEP_S from `base`, in a ten-minute cycle (shifted per device):
    40 s hot then 30 s between clear and threshold, a single hot reading (too short to alert),
    frequency and voltage excursions, a power step up and down (fast changes), and for a
    battery a state of charge dipping below 15 % for a minute, recovering past 20 % later."""
    rng = random.Random(f"{device_type}-{shift}")
    readings = []
    for i in range(n):
        k = (i + shift) % 60
        temp = 40 + rng.uniform(-2, 2)
        if 10 <= k < 14:
            temp = 80 + rng.uniform(0, 10)
        elif 14 <= k < 17:
            temp = 72 + rng.uniform(0, 2)
        elif k == 30:
            temp = 78.0
        freq = 50 + rng.uniform(-0.1, 0.1)
        if 20 <= k < 23:
            freq = 50.7 + rng.uniform(0, 0.3)
        elif 40 <= k < 42:
            freq = 49.2 - rng.uniform(0, 0.3)
        volt = 230 + rng.uniform(-3, 3)
        if 45 <= k < 48:
            volt = 258 + rng.uniform(0, 4)
        elif 5 <= k < 7 and (i // 60) % 2:
            volt = 200 - rng.uniform(0, 4)
        power = 10 + rng.uniform(-1, 1) + (50 if 25 <= k < 35 else 0)
        body: dict[str, Any] = {
            "device_id": device,
            "site_id": site,
            "device_type": device_type,
            "ts": (base + timedelta(seconds=STEP_S * i)).isoformat(),
            "seq": i,
            "temperature_c": round(temp, 3),
            "frequency_hz": round(freq, 4),
            "voltage_v": round(volt, 3),
            "power_kw": round(power, 4),
        }
        if device_type == "battery":
            soc = 50 + rng.uniform(-1, 1)
            if 50 <= k < 56:
                soc = 12 + rng.uniform(-1, 1)
            elif 56 <= k < 58:
                soc = 17 + rng.uniform(-1, 1)
            body["soc_pct"] = round(soc, 3)
        readings.append(body)
    return readings


class Hour:
    """An hour of readings of three devices of a new site, sent in time order (late, as a
    gateway that was cut off for an hour would get them), then a marker reading per device
    that opens an alert of its own: once the three are in the alerts table, the alerter has
    evaluated, and the projection stored, everything each device sent before."""

    def __init__(
        self, platform: Components, tokens: dict[str, str], db: psycopg.Connection
    ) -> None:
        self.site = f"site-{uuid.uuid4().hex[:8]}"
        key = create_key(db, self.site)
        scope = {"site_id": self.site}
        self.rules: dict[str, dict[str, Any]] = {}
        for name, default_id in DEFAULTS.items():  # the defaults, scoped to this site
            r = api(platform, tokens["viewer"], "GET", f"/api/v1/alert-rules/{default_id}")
            assert r.status_code == 200, r.text
            spec = {
                k: v for k, v in r.json().items() if k not in ("id", "created_at", "updated_at")
            }
            self.rules[name] = register(platform, tokens, {**spec, "scope": scope})
        self.rules["swing"] = register(
            platform,
            tokens,
            {
                "kind": "rate_of_change",
                "name": "Power swing",
                "severity": "major",
                "metric": "power_kw",
                "threshold": 0.5,
                "window_s": 60,
                "scope": scope,
            },
        )
        marker = register(
            platform,
            tokens,
            {
                "kind": "threshold",
                "name": "marker",
                "severity": "warning",
                "metric": "current_a",
                "op": "gt",
                "threshold": 1000,
                "scope": scope,
            },
        )
        now = datetime.now(UTC).replace(microsecond=0)
        self.start = now - timedelta(hours=1)
        n = 3600 // STEP_S - 5  # the last a minute ago
        self.devices = [new_device() for _ in range(3)]
        types = ("battery", "battery", "genset")
        sent = [
            hour_of(d, self.site, t, shift, self.start, n)
            for d, t, shift in zip(self.devices, types, (0, 17, 41), strict=True)
        ]
        for i in range(0, n, 60):  # ten minutes of the three devices a request
            post(platform, key, [r for readings in sent for r in readings[i : i + 60]])
        self.end = datetime.now(UTC) - timedelta(seconds=1)
        post(
            platform,
            key,
            [
                {
                    "device_id": d,
                    "site_id": self.site,
                    "device_type": t,
                    "ts": self.end.isoformat(),
                    "current_a": 2000,
                }
                for d, t in zip(self.devices, types, strict=True)
            ],
        )
        wait_for(
            lambda: len(live_alerts(db, marker["id"])) == 3, 60, "the marker alerts of the hour"
        )


@pytest.fixture(scope="module")
def hour(platform: Components, tokens: dict[str, str], stack: Settings) -> Hour:
    with psycopg.connect(stack.database_url, autocommit=True) as db:
        return Hour(platform, tokens, db)


@pytest.mark.parametrize("name", ["soc", "hot", "frequency", "voltage", "swing"])
def test_backtest_of_an_hour_yields_exactly_the_alerts_the_alerter_raised(
    hour: Hour, db: psycopg.Connection, tmp_path: Path, name: str
) -> None:
    rule = hour.rules[name]
    report = backtest(rule, tmp_path, hour.start, hour.end)
    live = live_alerts(db, rule["id"])
    assert alerts_of(report) == live
    assert report["rule_id"] == rule["id"]
    # several episodes opening and clearing, on the batteries (soc) or every device
    devices = {a[1] for a in live}
    assert len(devices) == (2 if name == "soc" else 3)
    assert sum(a[3] is not None for a in live) >= 2 * len(devices)
    summary = report["summary"]
    assert summary["alerts"] == len(live)
    assert summary["open_at_end"] == sum(a[3] is None for a in live)
    assert summary["devices"] == 3  # the rules are scoped to the site
    assert summary["readings"] == 3 * (3600 // STEP_S - 5)  # the site's readings, the rule's
    for a in report["alerts"]:
        assert a["site_id"] == hour.site and a["peak"] is not None


def test_the_peaks_are_the_most_extreme_values_of_each_episode(hour: Hour, tmp_path: Path) -> None:
    hot = backtest(hour.rules["hot"], tmp_path, hour.start, hour.end)["alerts"]
    assert all(80 <= a["peak"] <= 90 for a in hot)  # the hot readings, not the ones at 72-74
    frequency = backtest(hour.rules["frequency"], tmp_path, hour.start, hour.end)["alerts"]
    assert {a["peak"] > 50.5 for a in frequency} == {True, False}  # above and below the band
    swing = backtest(hour.rules["swing"], tmp_path, hour.start, hour.end)["alerts"]
    assert all(abs(a["peak"]) > 0.5 for a in swing)  # a rate (kW/s), beyond the limit
    assert {a["peak"] > 0 for a in swing} == {True, False}  # the step up, and down


def test_two_backtests_of_a_range_print_the_same(hour: Hour, tmp_path: Path) -> None:
    path = tmp_path / "swing.json"
    path.write_text(json.dumps(hour.rules["swing"]))
    args = ["--rule", str(path), "--from", hour.start.isoformat(), "--to", hour.end.isoformat()]
    runs = [microgrid_cli("backtest", *args, "--site", hour.site) for _ in range(2)]
    runs += [microgrid_cli("backtest", *args, "--json") for _ in range(2)]
    assert [r.returncode for r in runs] == [0] * 4, runs[0].stderr
    assert runs[2].stdout == runs[3].stdout
    table = [r.stdout.rsplit("; read ", 1)[0] for r in runs[:2]]  # all but what the read took
    assert table[0] == table[1]
    assert hour.devices[0] in table[0] and "open" in table[0]
    assert f"rule {hour.rules['swing']['id']} (Power swing):" in table[0]
    assert "readings evaluated" in table[0]


def test_a_new_rule_is_back_tested_without_a_trace(
    hour: Hour, db: psycopg.Connection, stack: Settings, tmp_path: Path
) -> None:
    """A rule never registered gets an id of its own (the same each time); no alert of it is
    stored, and no topic is made."""

    async def topics() -> set[str]:
        admin = AIOKafkaAdminClient(**stack.kafka_client)
        await admin.start()
        try:
            return set(await admin.list_topics())
        finally:
            await admin.close()

    before = asyncio.run(topics())
    server_set = ("id", "created_at", "updated_at")
    spec = {k: v for k, v in hour.rules["hot"].items() if k not in server_set}
    spec["threshold"], spec["clear_threshold"] = 60, 50
    reports = [
        backtest(spec, tmp_path, hour.start, hour.end, "--site", hour.site) for _ in range(2)
    ]
    assert reports[0] == reports[1]
    rule_id = reports[0]["rule_id"]
    assert len(reports[0]["alerts"]) >= 3
    assert rule_id not in {r["id"] for r in hour.rules.values()}
    assert db.execute("SELECT count(*) FROM alerts WHERE rule_id = %s", (rule_id,)).fetchone() == (
        0,
    )
    assert asyncio.run(topics()) == before


def test_offline_alerts_differ_from_live_only_where_readings_were_late(
    platform: Components,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
    tmp_path: Path,
) -> None:
    """Readings on time: the same alerts, opened within a tick of each other. Readings that
    were merely late: live opened an alert on the wall clock that the readings' own times do
    not show, and the backtest has none."""
    device = new_device()
    silent_s = 2.0
    rule = register(
        platform,
        tokens,
        {
            "kind": "offline",
            "name": "quiet",
            "severity": "warning",
            "silent_s": silent_s,
            "scope": {"device_id": device},
        },
    )
    sent: list[datetime] = []

    def send(*times: datetime) -> None:
        sent.extend(times)
        post(
            platform,
            device_key,
            [
                {"device_id": device, "site_id": site, "device_type": "load", "ts": t.isoformat()}
                for t in times
            ],
        )

    def live_count(opened: int, cleared: int) -> bool:
        alerts = live_alerts(db, rule["id"])
        return len(alerts) == opened and sum(a[3] is not None for a in alerts) == cleared

    start = datetime.now(UTC)
    send(start)  # on time, then silent
    wait_for(lambda: live_count(1, 0), 15, "an offline alert")
    send(datetime.now(UTC))  # on time: clears it
    wait_for(lambda: live_count(1, 1), 15, "the alert cleared")
    wait_for(lambda: live_count(2, 1), 15, "a second offline alert")
    # what the device had measured in the meantime, every half second, comes late: live
    # cleared the alert it opened; in the readings' own times the device was never silent
    late_from, now = sent[-1], datetime.now(UTC)
    steps = int((now - late_from).total_seconds() / 0.5)
    send(*(late_from + timedelta(seconds=0.5 * i) for i in range(1, steps + 1)))
    wait_for(lambda: live_count(2, 2), 15, "the alert cleared by the late readings")
    wait_for(lambda: live_count(3, 2), 15, "a third offline alert, still open")

    report = backtest(rule, tmp_path, start, "now")
    tested = {a[0]: a for a in alerts_of(report)}
    live = {a[0]: a for a in live_alerts(db, rule["id"])}
    starts = {alert_id(rule["id"], device, t): t for t in sent}
    assert len(tested) == 2 and set(tested) < set(live)
    for i, (_, _, opened, cleared) in tested.items():
        due = starts[i] + timedelta(seconds=silent_s)
        assert due < opened <= due + timedelta(milliseconds=1)
        assert 0 <= (live[i][2] - opened).total_seconds() <= TICK_SLACK_S
        assert live[i][3] == cleared
    [(only_live, *_, cleared)] = [live[i] for i in set(live) - set(tested)]
    assert cleared is not None and (cleared - starts[only_live]).total_seconds() <= silent_s
    peaks = sorted(a["peak"] for a in report["alerts"])
    assert peaks[0] > silent_s  # the silences' lengths (s), the open one's up to --to


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rule", "{missing}", "--from", "1h"], "cannot read rule file"),
        (["--rule", "{bad_json}", "--from", "1h"], "is not JSON"),
        (["--rule", "{bad_rule}", "--from", "1h"], "low: an outside rule needs low < high"),
        (["--rule", "{rule}", "--from", "yesterday"], "'yesterday' is not a time"),
        (["--rule", "{rule}", "--from", "1h", "--to", "2h"], "empty range"),
        (["--rule", "{rule}", "--from", "2026-11-30T08:00:00"], "has no UTC offset"),
    ],
)
def test_bad_arguments_exit_1_with_the_reason(
    tmp_path: Path, stack: Settings, args: list[str], message: str
) -> None:
    files = {
        "missing": tmp_path / "missing.json",
        "bad_json": tmp_path / "bad.json",
        "bad_rule": tmp_path / "bad_rule.json",
        "rule": tmp_path / "rule.json",
    }
    files["bad_json"].write_text("{")
    files["bad_rule"].write_text(
        json.dumps(
            {
                "kind": "threshold",
                "name": "x",
                "severity": "major",
                "metric": "frequency_hz",
                "op": "outside",
                "low": 51,
                "high": 49,
            }
        )
    )
    files["rule"].write_text(
        json.dumps({"kind": "offline", "name": "x", "severity": "major", "silent_s": 60})
    )
    done = microgrid_cli("backtest", *(a.format(**files) for a in args), "--json")
    assert done.returncode == 1
    assert message in done.stderr
    assert done.stdout == ""
