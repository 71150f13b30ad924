"""Alert rules to live alerts: thresholds with `for` and hysteresis, offline devices, crash
recovery of the alerter, SSE delivery and resumption, and acknowledgement."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from tests.conftest import Components, wait_for
from tests.sse import SSEClient
from tests.support import new_device


def api(platform: Components, token: str, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(
        method,
        f"{platform.api_url}{path}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
        **kw,
    )


def rule(platform: Components, tokens: dict[str, str], **spec: Any) -> str:
    body = {"name": f"test {uuid.uuid4().hex[:6]}", "severity": "major", **spec}
    r = api(platform, tokens["admin"], "POST", "/api/v1/alert-rules", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def send(
    platform: Components, key: str, device: str, site: str, at: datetime, **metrics: float
) -> float:
    """POST one reading; return the monotonic time the gateway accepted it."""
    body = {
        "device_id": device,
        "site_id": site,
        "device_type": "battery",
        "ts": at.isoformat(),
        **metrics,
    }
    r = httpx.post(
        f"{platform.gateway_url}/api/v1/telemetry",
        json=body,
        timeout=10,
        headers={"Authorization": f"Bearer {key}"},
    )
    assert r.status_code == 202, r.text
    return time.monotonic()


def alerts_of(db: psycopg.Connection, rule_id: str, device: str) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT id, status FROM alerts WHERE rule_id = %s AND device_id = %s ORDER BY opened_at",
        (rule_id, device),
    ).fetchall()


def notifications_of(db: psycopg.Connection, alert_ids: list[str]) -> list[str]:
    rows = db.execute(
        "SELECT kind FROM notifications WHERE alert_id = ANY(%s) ORDER BY created_at",
        (alert_ids,),
    ).fetchall()
    return [r[0] for r in rows]


@pytest.fixture()
def sse(platform: Components, tokens: dict[str, str]) -> Any:
    client = SSEClient(f"{platform.api_url}/api/v1/stream", tokens["viewer"])
    yield client
    client.close()


def test_threshold_held_for_its_duration_opens_one_alert_seen_live_within_a_second(
    platform: Components,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
    sse: SSEClient,
) -> None:
    device = new_device()
    rule_id = rule(
        platform,
        tokens,
        kind="threshold",
        metric="temperature_c",
        op="gt",
        threshold=75,
        clear_threshold=70,
        for_s=10,
        scope={"device_id": device},
    )
    time.sleep(0.5)  # the rule reaches the alerter through its topic
    now = datetime.now(UTC)
    send(platform, device_key, device, site, now - timedelta(seconds=12), temperature_c=80)
    send(platform, device_key, device, site, now - timedelta(seconds=6), temperature_c=81)
    time.sleep(1.0)
    assert alerts_of(db, rule_id, device) == []  # not yet held for 10 s
    accepted = send(platform, device_key, device, site, now, temperature_c=82)
    opened = wait_for(
        lambda: sse.of("alert.opened", rule_id=rule_id, device_id=device), 5, "alert.opened on SSE"
    )
    assert opened[0].received - accepted < 1.0
    assert opened[0].data["status"] == "active_unacknowledged"
    assert "temperature_c 82 above 75" in opened[0].data["message"]
    wait_for(
        lambda: sse.of("notification.created", alert_id=opened[0].data["id"]),
        5,
        "notification.created on SSE",
    )
    # the condition repeating does not open another alert
    send(platform, device_key, device, site, now + timedelta(seconds=1), temperature_c=90)
    time.sleep(1.0)
    rows = alerts_of(db, rule_id, device)
    assert len(rows) == 1
    assert notifications_of(db, [rows[0][0]]) == ["alert.opened"]


def test_values_hovering_between_clear_and_threshold_do_not_flap_then_clear(
    platform: Components,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
) -> None:
    device = new_device()
    rule_id = rule(
        platform,
        tokens,
        kind="threshold",
        metric="temperature_c",
        op="gt",
        threshold=75,
        clear_threshold=70,
        scope={"device_id": device},
    )
    time.sleep(0.5)
    start = datetime.now(UTC) - timedelta(seconds=30)
    values = [76, 74, 76, 72, 75.5, 71, 76]  # above and below 75, never down to 70
    for i, v in enumerate(values):
        send(platform, device_key, device, site, start + timedelta(seconds=i), temperature_c=v)
    time.sleep(1.5)
    rows = alerts_of(db, rule_id, device)
    assert [r[1] for r in rows] == ["active_unacknowledged"]
    send(platform, device_key, device, site, start + timedelta(seconds=10), temperature_c=65)
    wait_for(
        lambda: [r[1] for r in alerts_of(db, rule_id, device)] == ["cleared_unacknowledged"],
        5,
        "alert cleared",
    )
    assert notifications_of(db, [rows[0][0]]) == ["alert.opened", "alert.cleared"]


def test_offline_rule_fires_for_a_silent_device_and_clears_when_it_reports(
    platform: Components,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
) -> None:
    device = new_device()
    rule_id = rule(platform, tokens, kind="offline", silent_s=2, scope={"device_id": device})
    time.sleep(0.5)
    send(platform, device_key, device, site, datetime.now(UTC), soc_pct=50)
    wait_for(lambda: alerts_of(db, rule_id, device), 10, "offline alert")
    assert [r[1] for r in alerts_of(db, rule_id, device)] == ["active_unacknowledged"]
    send(platform, device_key, device, site, datetime.now(UTC), soc_pct=50)
    wait_for(
        lambda: [r[1] for r in alerts_of(db, rule_id, device)] == ["cleared_unacknowledged"],
        10,
        "offline alert cleared",
    )


def test_alerter_killed_mid_stream_opens_no_duplicate_and_misses_no_alert(
    platform: Components,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
) -> None:
    rule_id = rule(
        platform,
        tokens,
        kind="threshold",
        metric="temperature_c",
        op="gt",
        threshold=75,
        scope={"site_id": site},
    )
    time.sleep(0.5)
    devices = [new_device() for _ in range(6)]
    episodes = 8
    start = datetime.now(UTC) - timedelta(minutes=5)

    def stream() -> None:
        with httpx.Client(timeout=10) as client:
            for i in range(episodes * 2):
                readings = [
                    {
                        "device_id": d,
                        "site_id": site,
                        "device_type": "battery",
                        "ts": (start + timedelta(seconds=i)).isoformat(),
                        "temperature_c": 90 if i % 2 == 0 else 60,
                    }
                    for d in devices
                ]
                r = client.post(
                    f"{platform.gateway_url}/api/v1/telemetry/batch",
                    json={"readings": readings},
                    headers={"Authorization": f"Bearer {device_key}"},
                )
                assert r.status_code == 202
                time.sleep(0.15)

    producer = threading.Thread(target=stream)
    producer.start()

    def opened() -> int:
        row = db.execute("SELECT count(*) FROM alerts WHERE rule_id = %s", (rule_id,)).fetchone()
        return int(row[0]) if row else 0

    wait_for(opened, 20, "first alerts")
    platform.kill("alerter")
    time.sleep(1.0)
    platform.start("alerter")
    producer.join()

    def settled() -> bool:
        row = db.execute(
            "SELECT count(*), count(*) FILTER (WHERE status = 'cleared_unacknowledged')"
            " FROM alerts WHERE rule_id = %s",
            (rule_id,),
        ).fetchone()
        return row == (len(devices) * episodes, len(devices) * episodes)

    wait_for(settled, 60, "every episode opened and cleared once")
    time.sleep(1.0)
    assert settled()
    per_device = db.execute(
        "SELECT device_id, count(*) FROM alerts WHERE rule_id = %s GROUP BY 1", (rule_id,)
    ).fetchall()
    assert sorted(n for _, n in per_device) == [episodes] * len(devices)


def test_sse_client_resuming_with_last_event_id_gets_exactly_what_it_missed(
    platform: Components,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
) -> None:
    """Alert, notification and command events are resumed exactly; device.latest events are a
    lossy feed, never resumed (their id names the position of the others)."""
    url = f"{platform.api_url}/api/v1/stream"
    rule_id = rule(
        platform,
        tokens,
        kind="threshold",
        metric="soc_pct",
        op="lt",
        threshold=10,
        scope={"site_id": site},
    )

    def open_alert(device: str) -> str:
        def opened() -> list[tuple[Any, ...]]:
            send(platform, device_key, device, site, datetime.now(UTC), soc_pct=5)
            return alerts_of(db, rule_id, device)

        return str(wait_for(opened, 30, f"an alert on {device}")[0][0])

    def reliable(client: SSEClient) -> list[tuple[str, str]]:
        return [(e.id, e.event) for e in client.events if e.event != "device.latest"]

    def notified(client: SSEClient, alert_ids: list[str]) -> bool:
        return all(client.of("notification.created", alert_id=a) for a in alert_ids)

    def order(event_id: str) -> tuple[int, int]:
        ms, _, seq = event_id.partition("-")
        return int(ms), int(seq)

    reference = SSEClient(url, tokens["viewer"])
    first = SSEClient(url, tokens["viewer"])
    resumed = None
    try:
        earlier = [open_alert(new_device()) for _ in range(3)]
        wait_for(lambda: notified(first, earlier), 10, "first events")
        first.close()
        resume_from = first.events[-1].id  # what a browser would send: the last id it got
        later = [open_alert(new_device()) for _ in range(4)]
        wait_for(lambda: notified(reference, later), 10, "later events")
        resumed = SSEClient(url, tokens["viewer"], last_event_id=resume_from)
        expected = [(i, name) for i, name in reliable(reference) if order(i) > order(resume_from)]
        wait_for(
            lambda: reliable(resumed)[: len(expected)] == expected,
            10,
            "resumed client to catch up",
        )
        assert {e.data["id"] for e in resumed.of("alert.opened")} >= set(later)
        assert not {e.data["id"] for e in resumed.of("alert.opened")} & set(earlier)
        assert not resumed.of("error")
    finally:
        for client in (reference, first, resumed):
            if client is not None:
                client.close()


def test_stream_needs_a_valid_token_by_header_or_query(
    platform: Components, tokens: dict[str, str]
) -> None:
    url = f"{platform.api_url}/api/v1/stream"
    assert httpx.get(url, timeout=5).status_code == 401
    assert httpx.get(url, params={"access_token": "forged"}, timeout=5).status_code == 401
    with httpx.stream("GET", url, params={"access_token": tokens["viewer"]}, timeout=5) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")


def test_viewer_cannot_ack_an_alert_operator_can_and_twice_is_harmless(
    platform: Components,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
    sse: SSEClient,
) -> None:
    device = new_device()
    rule_id = rule(
        platform,
        tokens,
        kind="threshold",
        metric="soc_pct",
        op="lt",
        threshold=10,
        scope={"device_id": device},
    )
    time.sleep(0.5)
    send(platform, device_key, device, site, datetime.now(UTC), soc_pct=5)
    rows = wait_for(lambda: alerts_of(db, rule_id, device), 10, "alert")
    alert_id = rows[0][0]
    path = f"/api/v1/alerts/{alert_id}/ack"
    assert api(platform, tokens["viewer"], "POST", path).status_code == 403
    first = api(platform, tokens["operator"], "POST", path)
    assert first.status_code == 200
    assert first.json()["status"] == "active_acknowledged"
    assert first.json()["acknowledged_by"] == platform.s.auth_operator_username
    again = api(platform, tokens["admin"], "POST", path)
    assert again.status_code == 200
    assert again.json()["acknowledged_at"] == first.json()["acknowledged_at"]
    assert again.json()["acknowledged_by"] == platform.s.auth_operator_username
    wait_for(lambda: sse.of("alert.acknowledged", id=alert_id), 5, "alert.acknowledged")
    assert len(sse.of("alert.acknowledged", id=alert_id)) == 1
    send(platform, device_key, device, site, datetime.now(UTC), soc_pct=50)
    wait_for(
        lambda: [r[1] for r in alerts_of(db, rule_id, device)] == ["cleared"],
        10,
        "acknowledged alert cleared",
    )
    assert api(platform, tokens["operator"], "POST", "/api/v1/alerts/nope/ack").status_code == 404
