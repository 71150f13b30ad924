"""The operator dashboard's routes, against the real processes: the command catalogue against
what `POST /api/v1/control/commands` accepts, alerts grouped by rule and site, bulk
acknowledgements (by ids and by filter, with the roles and sites that may make them), devices
that are alerting, and the overview of a fresh site for admins and for a user of some sites.

Alerts are raised the way devices raise them: rules scoped to a fresh site, readings through
the gateway, the alerter and the alerts projection. The rules watch `power_kw` and
`current_a`, which no default rule does."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest

from runtime.keys import create_key
from tests.conftest import Components, wait_for
from tests.e2e.test_query_api import assert_problem, auth
from tests.e2e.test_tenancy_api import login, make_user, outbox_rows
from tests.sse import SSEClient
from tests.support import new_device

PROJECTED_S = 20  # an acknowledgement through the outbox, Kafka and the projection
HOT = 150.0  # above every test rule's threshold (100)
CALM = 5.0


@pytest.fixture(scope="module")
def client(platform: Components) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=platform.api_url, timeout=30) as c:
        yield c


# --- helpers ---------------------------------------------------------------------------------


def post_readings(
    platform: Components, key: str, site: str, readings: dict[str, dict[str, Any]]
) -> None:
    """One reading per device ({device: {"device_type": ..., metrics...}}), now."""
    now = datetime.now(UTC)
    batch = [
        {
            "device_id": device,
            "site_id": site,
            "device_type": "battery",
            "ts": now.isoformat(),
            **fields,
        }
        for device, fields in readings.items()
    ]
    r = httpx.post(
        f"{platform.gateway_url}/api/v1/telemetry/batch",
        json={"readings": batch},
        headers=auth(key),
        timeout=10,
    )
    assert r.status_code == 202, r.text


def make_rule(client: httpx.Client, admin: str, site: str, metric: str, severity: str) -> str:
    """A rule of the site: `metric` above 100 opens an alert at once, below 50 clears it."""
    body = {
        "name": f"dashboard {metric} {uuid.uuid4().hex[:6]}",
        "kind": "threshold",
        "metric": metric,
        "op": "gt",
        "threshold": 100.0,
        "clear_threshold": 50.0,
        "for_s": 0.0,
        "severity": severity,
        "scope": {"site_id": site},
    }
    r = client.post("/api/v1/alert-rules", headers=auth(admin), json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def site_alerts(db: psycopg.Connection, site: str) -> dict[tuple[str, str], str]:
    """{(rule id, device): alert id} of the site's open alerts."""
    rows = db.execute(
        "SELECT rule_id::text, device_id, id FROM alerts WHERE site_id = %s"
        " AND status <> 'cleared'",
        (site,),
    ).fetchall()
    return {(r[0], r[1]): r[2] for r in rows}


@dataclass(frozen=True)
class AlertingSite:
    name: str
    key: str
    devices: list[str]
    power_rule: str  # power_kw above 100: critical
    current_rule: str  # current_a above 100: minor
    alerts: dict[tuple[str, str], str]  # (rule id, device) -> alert id

    def alert(self, rule: str, device: str) -> str:
        return self.alerts[(rule, device)]


def alerting_site(
    platform: Components,
    client: httpx.Client,
    db: psycopg.Connection,
    admin: str,
    hot_power: int,
    hot_current: int,
    calm: int = 0,
) -> AlertingSite:
    """A fresh site whose first `hot_power` devices have a critical alert (power_kw), whose
    first `hot_current` a minor one (current_a), and `calm` more devices without alerts."""
    site = f"site-{uuid.uuid4().hex[:8]}"
    key = create_key(db, site)
    devices = [new_device() for _ in range(max(hot_power, hot_current) + calm)]
    power_rule = make_rule(client, admin, site, "power_kw", "critical")
    current_rule = make_rule(client, admin, site, "current_a", "minor")
    readings = {
        d: {
            "power_kw": HOT if i < hot_power else CALM,
            "current_a": HOT if i < hot_current else CALM,
        }
        for i, d in enumerate(devices)
    }
    want = {(power_rule, d) for d in devices[:hot_power]}
    want |= {(current_rule, d) for d in devices[:hot_current]}
    last = [0.0]

    def raised() -> bool:
        if time.monotonic() - last[0] >= 0.5:  # again until the alerter has the rules
            post_readings(platform, key, site, readings)
            last[0] = time.monotonic()
        return set(site_alerts(db, site)) == want

    wait_for(raised, 30, f"the alerts of {site}")
    return AlertingSite(site, key, devices, power_rule, current_rule, site_alerts(db, site))


def acknowledged(db: psycopg.Connection, ids: list[str]) -> dict[str, tuple[Any, ...]]:
    """{alert id: (status, acknowledged_at, acknowledged_by)}"""
    rows = db.execute(
        "SELECT id, status, acknowledged_at, acknowledged_by FROM alerts WHERE id = ANY(%s)",
        (ids,),
    ).fetchall()
    return {r[0]: tuple(r[1:]) for r in rows}


def wait_acknowledged(db: psycopg.Connection, ids: list[str], by: str) -> None:
    wait_for(
        lambda: all(row[2] == by for row in acknowledged(db, ids).values()),
        PROJECTED_S,
        f"{len(ids)} alerts acknowledged by {by}",
    )


def groups(client: httpx.Client, token: str, **params: Any) -> list[dict[str, Any]]:
    r = client.get("/api/v1/alerts/groups", params=params, headers=auth(token))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["truncated"] is False
    items: list[dict[str, Any]] = body["items"]
    return items


def ack(client: httpx.Client, token: str, body: Any) -> httpx.Response:
    return client.post("/api/v1/alerts/ack", json=body, headers=auth(token))


# --- the command catalogue -------------------------------------------------------------------


def test_the_catalogue_is_what_sending_a_command_accepts(
    platform: Components, client: httpx.Client, tokens: dict[str, str], db: psycopg.Connection
) -> None:
    r = client.get("/api/v1/control/catalogue", headers=auth(tokens["viewer"]))
    assert r.status_code == 200, r.text
    catalogue = r.json()
    types = catalogue["device_types"]
    assert set(types) == {"battery", "pv_inverter", "genset", "load", "meter"}
    assert types["battery"]["charge"] == {"power_kw": {"min": 0.1, "max": 10000}}
    assert all(commands["reboot"] == {} for commands in types.values())
    assert catalogue["default_ttl_s"] == 60
    assert (catalogue["min_ttl_s"], catalogue["max_ttl_s"]) == (1, 86400)

    # one device of each type, that has reported
    site = f"site-{uuid.uuid4().hex[:8]}"
    key = create_key(db, site)
    devices = {t: new_device() for t in types}
    for device_type, device in devices.items():
        post_readings(platform, key, site, {device: {"device_type": device_type, "power_kw": 1}})
    wait_for(
        lambda: (
            db.execute(
                "SELECT count(*) FROM devices WHERE device_id = ANY(%s)", (list(devices.values()),)
            ).fetchone()
            == (len(devices),)
        ),
        30,
        "a device of each type",
    )
    operator = auth(tokens["operator"])

    def send(device: str, command: str, params: dict[str, Any], **extra: Any) -> httpx.Response:
        body = {"device_id": device, "command": command, "params": params, **extra}
        return client.post("/api/v1/control/commands", json=body, headers=operator)

    every_command = {c for commands in types.values() for c in commands}
    for device_type, commands in types.items():
        device = devices[device_type]
        for command, spec in commands.items():
            # inside: each parameter at either end of its range
            for end in ("min", "max"):
                params = {name: bounds[end] for name, bounds in spec.items()}
                r = send(device, command, params)
                assert r.status_code == 202, (device_type, command, params, r.text)
                assert r.json()["status"] == "queued"
                if not spec:
                    break
            # just outside: one parameter a float step past an end, or one it does not take
            for name, bounds in spec.items():
                for outside in (
                    math.nextafter(bounds["min"], -math.inf),
                    math.nextafter(bounds["max"], math.inf),
                ):
                    params = {n: b["min"] for n, b in spec.items()} | {name: outside}
                    problem = assert_problem(send(device, command, params), 422)
                    assert f"params.{name}" in [e["field"] for e in problem["errors"]], problem
            assert_problem(send(device, command, {**spec_values(spec), "extra": 1}), 422)
        for command in sorted(every_command - set(commands)):  # another type's command
            problem = assert_problem(send(device, command, {}), 422)
            assert problem["errors"][0]["field"] == "command", problem

    battery = devices["battery"]
    assert send(battery, "reboot", {}, ttl_s=catalogue["max_ttl_s"]).status_code == 202
    for ttl in (catalogue["min_ttl_s"] - 1, catalogue["max_ttl_s"] + 1):
        assert_problem(send(battery, "reboot", {}, ttl_s=ttl), 422)


def spec_values(spec: dict[str, dict[str, float]]) -> dict[str, float]:
    return {name: bounds["min"] for name, bounds in spec.items()}


# --- alert groups ----------------------------------------------------------------------------


def test_alerts_come_back_grouped_by_rule_and_site_with_their_counts(
    platform: Components, client: httpx.Client, tokens: dict[str, str], db: psycopg.Connection
) -> None:
    admin, viewer = tokens["admin"], tokens["viewer"]
    s = alerting_site(platform, client, db, admin, hot_power=3, hot_current=2, calm=1)
    rules = {
        r["id"]: r["name"]
        for r in client.get("/api/v1/alert-rules", headers=auth(admin)).json()["items"]
    }
    power = {
        "rule_id": s.power_rule,
        "rule_name": rules[s.power_rule],
        "site_id": s.name,
        "severity": "critical",
        "count": 3,
        "unacknowledged": 3,
        "devices": 3,
    }
    current = {
        "rule_id": s.current_rule,
        "rule_name": rules[s.current_rule],
        "site_id": s.name,
        "severity": "minor",
        "count": 2,
        "unacknowledged": 2,
        "devices": 2,
    }

    def mine(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The groups of this test's rules, without their times (checked below)."""
        keep = {s.power_rule, s.current_rule}
        return [
            {k: v for k, v in g.items() if not k.endswith("_opened_at")}
            for g in items
            if g["rule_id"] in keep
        ]

    got = groups(client, viewer, site_id=s.name)
    assert mine(got) == [power, current]  # critical before minor
    opened = db.execute(
        "SELECT min(opened_at), max(opened_at) FROM alerts WHERE rule_id = %s", (s.power_rule,)
    ).fetchone()
    assert opened is not None
    first = next(g for g in got if g["rule_id"] == s.power_rule)
    assert datetime.fromisoformat(first["first_opened_at"]) == opened[0]
    assert datetime.fromisoformat(first["last_opened_at"]) == opened[1]
    # the whole list is ordered by severity, then by size
    everything = groups(client, viewer)
    ranks = ["critical", "major", "minor", "warning"]
    keys = [(ranks.index(g["severity"]), -g["count"]) for g in everything]
    assert keys == sorted(keys)
    assert mine(everything) == [power, current]

    # filters
    assert mine(groups(client, viewer, site_id=s.name, rule_id=s.current_rule)) == [current]
    assert mine(groups(client, viewer, site_id=s.name, severity="critical")) == [power]
    assert mine(groups(client, viewer, device_id=s.devices[2])) == [
        {**power, "count": 1, "unacknowledged": 1, "devices": 1}
    ]
    assert groups(client, viewer, site_id=s.name, status="cleared") == []
    assert groups(client, viewer, site_id=s.name, status="active_acknowledged") == []
    assert mine(groups(client, viewer, site_id=s.name, status="active_unacknowledged")) == [
        power,
        current,
    ]
    for bad in ({"status": "opened"}, {"severity": "fatal"}, {"rule_id": "not-a-uuid"}):
        assert_problem(client.get("/api/v1/alerts/groups", params=bad, headers=auth(viewer)), 400)
    # and the alert list takes the same rule and status filters
    r = client.get(
        "/api/v1/alerts",
        params={"rule_id": s.power_rule, "status": "open", "limit": 10},
        headers=auth(viewer),
    )
    assert r.status_code == 200, r.text
    assert {a["id"] for a in r.json()["items"]} == {s.alert(s.power_rule, d) for d in s.devices[:3]}
    assert_problem(client.get("/api/v1/alerts", params={"status": "x"}, headers=auth(viewer)), 400)

    # an acknowledgement moves one alert out of `unacknowledged` (and of the status filter)
    acked = s.alert(s.power_rule, s.devices[0])
    assert client.post(f"/api/v1/alerts/{acked}/ack", headers=auth(admin)).status_code == 200
    assert mine(groups(client, viewer, site_id=s.name)) == [
        {**power, "unacknowledged": 2},
        current,
    ]
    assert mine(groups(client, viewer, site_id=s.name, status="active_acknowledged")) == [
        {**power, "count": 1, "unacknowledged": 0, "devices": 1}
    ]
    # a rule deleted since is named by its id
    r = client.delete(f"/api/v1/alert-rules/{s.current_rule}", headers=auth(admin))
    assert r.status_code == 204, r.text
    assert mine(groups(client, viewer, site_id=s.name))[1] == {
        **current,
        "rule_name": s.current_rule,
    }


# --- bulk acknowledgement --------------------------------------------------------------------


def test_bulk_acknowledgement_by_ids_and_by_filter(
    platform: Components, client: httpx.Client, tokens: dict[str, str], db: psycopg.Connection
) -> None:
    s = alerting_site(platform, client, db, tokens["admin"], hot_power=4, hot_current=1)
    power = [s.alert(s.power_rule, d) for d in s.devices]
    current = s.alert(s.current_rule, s.devices[0])
    operator_name, admin_name = platform.s.auth_operator_username, platform.s.auth_admin_username
    live = SSEClient(f"{platform.api_url}/api/v1/stream", tokens["viewer"])

    # a viewer may not: nothing is queued, nothing changes
    refused = ack(client, tokens["viewer"], {"rule_id": s.power_rule})
    assert_problem(refused, 403)
    assert_problem(ack(client, tokens["viewer"], {"ids": power}), 403)
    assert sum(outbox_rows(db, d) for d in s.devices) == 0

    # by ids, with an unknown one and a repeat
    unknown = f"no-such-alert-{uuid.uuid4().hex[:6]}"
    r = ack(client, tokens["operator"], {"ids": [power[0], unknown, power[1], power[0]]})
    assert r.status_code == 202, r.text
    assert r.json() == {
        "acknowledged": [power[0], power[1]],
        "already": [],
        "unknown": [unknown],
        "more": False,
    }
    # at once the admin's for the same ids: queued again if the first are not applied yet
    # (the projection keeps the first acknowledgement), answered `already` if they are
    r = ack(client, tokens["admin"], {"ids": power[:2]})
    assert r.status_code == 202, r.text
    assert sorted(r.json()["acknowledged"] + r.json()["already"]) == sorted(power[:2])
    wait_acknowledged(db, power[:2], operator_name)
    rows = acknowledged(db, [*power, current])
    assert {rows[a][0] for a in power[:2]} == {"active_acknowledged"}
    assert all(rows[a][1] is None for a in [*power[2:], current])  # only those
    # what a user sees
    r = client.get(f"/api/v1/alerts?site_id={s.name}&limit=50", headers=auth(tokens["viewer"]))
    seen = {a["id"]: a for a in r.json()["items"]}
    assert seen[power[0]]["acknowledged_by"] == operator_name
    assert seen[power[2]]["acknowledged_by"] is None
    first_acked_at = seen[power[0]]["acknowledged_at"]

    # the same ids again: nothing new
    r = ack(client, tokens["admin"], {"ids": power[:2]})
    assert r.status_code == 202, r.text
    assert r.json() == {"acknowledged": [], "already": power[:2], "unknown": [], "more": False}

    # by filter: the rest of the power rule's alerts, not the other rule's
    r = ack(client, tokens["admin"], {"rule_id": s.power_rule, "site_id": s.name})
    assert r.status_code == 202, r.text
    body = r.json()
    assert sorted(body["acknowledged"]) == sorted(power[2:])
    assert body | {"acknowledged": []} == {
        "acknowledged": [],
        "already": [],
        "unknown": [],
        "more": False,
    }
    wait_acknowledged(db, power[2:], admin_name)
    rows = acknowledged(db, [*power, current])
    assert rows[current][1] is None
    assert {rows[a][2] for a in power} == {operator_name, admin_name}
    r = client.get(f"/api/v1/alerts?site_id={s.name}&limit=50", headers=auth(tokens["viewer"]))
    seen = {a["id"]: a for a in r.json()["items"]}
    assert seen[power[0]]["acknowledged_at"] == first_acked_at  # the first one stands
    # again: nothing left to acknowledge
    r = ack(client, tokens["admin"], {"rule_id": s.power_rule, "site_id": s.name})
    assert r.json() == {"acknowledged": [], "already": [], "unknown": [], "more": False}

    # a filter by status: cleared_unacknowledged takes only the cleared ones
    post_readings(platform, s.key, s.name, {s.devices[0]: {"current_a": CALM}})
    wait_for(
        lambda: acknowledged(db, [current])[current][0] == "cleared_unacknowledged",
        PROJECTED_S,
        "the current alert cleared",
    )
    filt = {"site_id": s.name, "status": "cleared_unacknowledged"}
    r = ack(client, tokens["operator"], filt)
    assert r.json()["acknowledged"] == [current]

    def status_and_by() -> tuple[Any, Any]:
        status, _, by = acknowledged(db, [current])[current]
        return status, by

    wait_for(
        lambda: status_and_by() == ("cleared", operator_name),
        PROJECTED_S,
        "the cleared alert acknowledged",
    )

    # live: one alert.acknowledged per alert, however often it was acknowledged
    wait_for(
        lambda: {e.data["id"] for e in live.of("alert.acknowledged")} >= {*power, current},
        PROJECTED_S,
        "alert.acknowledged events",
    )
    live.close()
    announced = [e.data["id"] for e in live.of("alert.acknowledged")]
    assert sorted(a for a in announced if a in {*power, current}) == sorted([*power, current])


def test_a_bulk_acknowledgement_needs_either_ids_or_a_filter(
    client: httpx.Client, tokens: dict[str, str]
) -> None:
    """Never "acknowledge everything" for a body that names nothing: 422 (400 for no body),
    as problem+json, before anything is looked up."""
    operator = tokens["operator"]
    neither_nor_both: list[dict[str, Any]] = [
        {},
        {"ids": None},
        {"ids": None, "site_id": None},
        {"ids": ["a"], "site_id": "site-x"},
    ]
    for body in neither_nor_both:
        problem = assert_problem(ack(client, operator, body), 422)
        assert "ids" in problem["detail"] and "filter" in problem["detail"], problem
    invalid: list[Any] = [
        {"ids": []},
        {"ids": [f"a{i}" for i in range(1001)]},
        {"status": "cleared"},  # already acknowledged: not a status to acknowledge
        {"severity": "fatal"},
        {"rule_id": "not-a-uuid"},
        {"everything": True},
        [],
    ]
    for body in invalid:
        assert_problem(ack(client, operator, body), 422)
    r = client.post(
        "/api/v1/alerts/ack",
        content=b"",
        headers={**auth(operator), "Content-Type": "application/json"},
    )
    assert r.status_code in (400, 422), r.text
    assert r.headers["content-type"].startswith("application/problem+json")


def test_a_filter_acknowledges_at_most_ten_thousand_alerts_a_call(
    client: httpx.Client, tokens: dict[str, str], db: psycopg.Connection
) -> None:
    """Alerts written straight into the read model (as if projected): 10,001 of one site."""
    site = f"site-{uuid.uuid4().hex[:8]}"
    rule = uuid.uuid4()
    opened = datetime.now(UTC) - timedelta(hours=1)
    with db.cursor() as cur:
        cur.execute(
            "INSERT INTO alerts (id, rule_id, device_id, site_id, severity, status, opened_at)"
            " SELECT %s || i, %s, %s || (i %% 50), %s, 'warning', 'active_unacknowledged',"
            " %s + i * interval '1 ms' FROM generate_series(0, 10000) i",
            (f"al-{site}-", rule, f"dev-{site}-", site, opened),
        )
    r = ack(client, tokens["admin"], {"site_id": site})
    assert r.status_code == 202, r.text
    body = r.json()
    assert len(body["acknowledged"]) == 10_000
    assert body["more"] is True
    newest = f"al-{site}-10000"  # oldest first: the newest one is left
    assert newest not in body["acknowledged"]

    def remaining() -> list[str]:
        rows = db.execute(
            "SELECT id FROM alerts WHERE site_id = %s AND acknowledged_at IS NULL", (site,)
        ).fetchall()
        return [r[0] for r in rows]

    wait_for(lambda: remaining() == [newest], 60, "10,000 acknowledgements projected")
    r = ack(client, tokens["admin"], {"site_id": site, "rule_id": str(rule)})
    assert r.json() == {"acknowledged": [newest], "already": [], "unknown": [], "more": False}


# --- devices that are alerting, the overview, and users of some sites -----------------------


def test_devices_say_whether_they_are_alerting(
    platform: Components, client: httpx.Client, tokens: dict[str, str], db: psycopg.Connection
) -> None:
    s = alerting_site(platform, client, db, tokens["admin"], hot_power=1, hot_current=0, calm=1)
    hot, calm = s.devices
    viewer = auth(tokens["viewer"])

    def listed(**params: Any) -> dict[str, bool]:
        r = client.get("/api/v1/devices", params={"site_id": s.name, **params}, headers=viewer)
        assert r.status_code == 200, r.text
        return {d["device_id"]: d["alerting"] for d in r.json()["items"]}

    assert listed() == {hot: True, calm: False}
    assert listed(status="alerting") == {hot: True}
    assert client.get(f"/api/v1/devices/{hot}", headers=viewer).json()["alerting"] is True
    assert_problem(client.get("/api/v1/devices", params={"status": "alert"}, headers=viewer), 400)
    # acknowledged, it is still alerting; cleared, it is not
    alert = s.alert(s.power_rule, hot)
    assert client.post(f"/api/v1/alerts/{alert}/ack", headers=auth(tokens["operator"])).is_success
    assert listed(status="alerting") == {hot: True}
    post_readings(platform, s.key, s.name, {hot: {"power_kw": CALM}})
    wait_for(lambda: listed(status="alerting") == {}, PROJECTED_S, "the alert cleared")
    assert listed() == {hot: False, calm: False}


def overview(client: httpx.Client, token: str, **params: Any) -> dict[str, Any]:
    r = client.get("/api/v1/overview", params=params, headers=auth(token))
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_overview_counts_a_fresh_site_and_a_scoped_user_sees_only_their_sites(
    platform: Components, client: httpx.Client, tokens: dict[str, str], db: psycopg.Connection
) -> None:
    admin = tokens["admin"]
    # site A: 3 devices, 2 with a critical alert, 1 of them also a minor one, 1 without
    a = alerting_site(platform, client, db, admin, hot_power=2, hot_current=1, calm=1)
    # and a pv inverter that last reported 10 minutes ago: offline (the default offline rule
    # alerts on it: wait for that, so the counts hold still)
    stale = new_device()
    r = httpx.post(
        f"{platform.gateway_url}/api/v1/telemetry",
        json={
            "device_id": stale,
            "site_id": a.name,
            "device_type": "pv_inverter",
            "ts": (datetime.now(UTC) - timedelta(minutes=10)).isoformat(),
            "power_kw": 1.0,
        },
        headers=auth(a.key),
        timeout=10,
    )
    assert r.status_code == 202, r.text
    wait_for(
        lambda: db.execute(
            "SELECT 1 FROM alerts WHERE device_id = %s AND status <> 'cleared'", (stale,)
        ).fetchone(),
        60,
        "the stale device's offline alert",
    )
    unread = db.execute(
        "SELECT count(*) FROM notifications WHERE site_id = %s AND acked_at IS NULL", (a.name,)
    ).fetchone()
    assert unread == (4,)  # one per alert opened
    expected = {
        "devices": {"total": 4, "online": 3, "offline": 1, "alerting": 3},
        "alerts": {"critical": 2, "major": 0, "minor": 1, "warning": 1},
        "unread_notifications": 4,
        "sites": [{"site_id": a.name, "devices": 4, "online": 3, "alerting": 3}],
        "sites_truncated": False,
        "offline_after_s": platform.s.device_offline_after_s,
    }
    assert overview(client, tokens["viewer"], site_id=a.name) == expected
    assert overview(client, admin, site_id=a.name, device_type="pv_inverter") == {
        "devices": {"total": 1, "online": 0, "offline": 1, "alerting": 1},
        "alerts": {"critical": 0, "major": 0, "minor": 0, "warning": 1},
        "unread_notifications": 1,
        "sites": [{"site_id": a.name, "devices": 1, "online": 0, "alerting": 1}],
        "sites_truncated": False,
        "offline_after_s": platform.s.device_offline_after_s,
    }
    # reading a notification, acknowledging an alert: unread goes down, open alerts stay
    note = db.execute(
        "SELECT id FROM notifications WHERE site_id = %s AND alert_id = %s",
        (a.name, a.alert(a.power_rule, a.devices[0])),
    ).fetchone()
    assert note is not None
    r = client.post(f"/api/v1/notifications/{note[0]}/ack", headers=auth(admin))
    assert r.status_code in (200, 202), r.text
    wait_for(
        lambda: overview(client, admin, site_id=a.name)["unread_notifications"] == 3,
        PROJECTED_S,
        "the notification read",
    )
    assert overview(client, admin, site_id=a.name)["alerts"] == expected["alerts"]

    # site B, and a user of site A (and of a site that has nothing)
    b = alerting_site(platform, client, db, admin, hot_power=1, hot_current=0)
    username = make_user(db, "operator", [a.name, f"site-{uuid.uuid4().hex[:8]}"])
    scoped = login(client, username)
    mine = overview(client, scoped)
    assert mine["sites"] == expected["sites"]
    assert mine["devices"] == expected["devices"]
    assert mine["alerts"] == expected["alerts"]
    assert mine["unread_notifications"] == 3
    nothing = {
        "devices": {"total": 0, "online": 0, "offline": 0, "alerting": 0},
        "alerts": {"critical": 0, "major": 0, "minor": 0, "warning": 0},
        "unread_notifications": 0,
        "sites": [],
        "sites_truncated": False,
        "offline_after_s": platform.s.device_offline_after_s,
    }
    assert overview(client, scoped, site_id=b.name) == nothing
    assert overview(client, admin, site_id=b.name)["devices"]["total"] == 1
    # their groups and devices hold only site A too
    assert {g["site_id"] for g in groups(client, scoped)} == {a.name}
    assert groups(client, scoped, site_id=b.name) == []
    r = client.get("/api/v1/devices", params={"status": "alerting"}, headers=auth(scoped))
    assert {d["site_id"] for d in r.json()["items"]} == {a.name}

    # their bulk acknowledgement of B's alert by id: unknown, and it stays unacknowledged
    b_alert = b.alert(b.power_rule, b.devices[0])
    r = ack(client, scoped, {"ids": [b_alert]})
    assert r.status_code == 202, r.text
    assert r.json() == {"acknowledged": [], "already": [], "unknown": [b_alert], "more": False}
    r = ack(client, scoped, {"site_id": b.name})
    assert r.json() == {"acknowledged": [], "already": [], "unknown": [], "more": False}
    assert outbox_rows(db, b.devices[0]) == 0
    # theirs, by filter: only A's alerts, never B's
    r = ack(client, scoped, {"severity": "critical"})
    assert r.status_code == 202, r.text
    assert set(r.json()["acknowledged"]) == {a.alert(a.power_rule, d) for d in a.devices[:2]}
    wait_acknowledged(db, r.json()["acknowledged"], username)
    assert acknowledged(db, [b_alert])[b_alert][1:] == (None, None)
