"""The query API end to end, against the real processes: who may call what, login and its
lockout, devices and downsampled readings projected from real ingest, keyset pagination,
notification acks, control commands, alert rules, hostile filters, operations endpoints, CORS."""

from __future__ import annotations

import base64
import json
import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import psycopg
import pytest

from contracts.alerting import SEVERITIES
from query_api.auth import HASHER
from runtime.keys import create_key
from tests.conftest import Components, wait_for
from tests.support import new_device, reading

PROBLEM_JSON = "application/problem+json"
CONTRACT_TABLES = (
    "devices",
    "telemetry_readings",
    "device_latest",
    "alert_rules",
    "alerts",
    "notifications",
    "control_commands",
    "users",
)
ALERT_STATUSES = ("active_unacknowledged", "active_acknowledged", "cleared")


# --- helpers ---------------------------------------------------------------------------------


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_problem(r: httpx.Response, status: int) -> dict[str, Any]:
    """The response is an RFC 9457 problem with this status."""
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    assert r.headers["content-type"].startswith(PROBLEM_JSON), r.headers
    body: dict[str, Any] = r.json()
    assert body["status"] == status
    assert body["title"]
    return body


def error_fields(r: httpx.Response) -> list[str]:
    return [e["field"] for e in assert_problem(r, 422)["errors"]]


def collect(
    client: httpx.Client, path: str, token: str, *, unpaged: bool = False, **params: Any
) -> tuple[list[dict[str, Any]], int]:
    """Follow next_cursor to the end: (every item, number of pages). `unpaged`: a list that
    answers every item at once (the rules), whatever their number."""
    items: list[dict[str, Any]] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        r = client.get(path, params=query, headers=auth(token))
        assert r.status_code == 200, r.text
        body = r.json()
        pages += 1
        assert unpaged or len(body["items"]) <= params.get("limit", 50)
        items.extend(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return items, pages
        assert body["items"], "a page with a next_cursor must not be empty"
        assert pages < 500, "pagination does not end"


def ingest(platform: Components, key: str, readings: list[dict[str, Any]]) -> None:
    for i in range(0, len(readings), 1000):
        chunk = readings[i : i + 1000]
        r = httpx.post(
            f"{platform.gateway_url}/api/v1/telemetry/batch",
            headers=auth(key),
            json={"readings": chunk},
            timeout=10,
        )
        assert r.status_code == 202, r.text
        assert r.json() == {"accepted": len(chunk)}


def wait_for_devices(client: httpx.Client, token: str, devices: list[str]) -> None:
    def visible() -> bool:
        return all(
            client.get(f"/api/v1/devices/{d}", headers=auth(token)).status_code == 200
            for d in devices
        )

    wait_for(visible, 30, f"devices {devices} in the query API")


def pv_reading(device_id: str, site_id: str, power_kw: float = 3.5) -> dict[str, Any]:
    body = reading(device_id, site_id, device_type="pv_inverter", power_kw=power_kw)
    del body["soc_pct"]
    return body


def threshold_rule(**overrides: Any) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "name": f"hot inverter {uuid.uuid4().hex[:6]}",
        "kind": "threshold",
        "metric": "temperature_c",
        "op": "gt",
        "threshold": 80.0,
        "clear_threshold": 75.0,
        "for_s": 30.0,
        "severity": "major",
        "scope": {"device_type": "pv_inverter"},
        "enabled": False,
    }
    rule.update(overrides)
    return {k: v for k, v in rule.items() if v is not None}


def insert_notification(db: psycopg.Connection, **overrides: Any) -> str:
    row: dict[str, Any] = {
        "id": f"nt-{uuid.uuid4().hex}",
        "alert_id": None,
        "device_id": f"dev-{uuid.uuid4().hex[:10]}",
        "site_id": f"site-{uuid.uuid4().hex[:8]}",
        "kind": "alert.opened",
        "severity": "major",
        "title": "Battery temperature high",
        "created_at": datetime.now(UTC),
        "acked_at": None,
        "acked_by": None,
    }
    row.update(overrides)
    db.execute(
        f"INSERT INTO notifications ({', '.join(row)}) VALUES ({', '.join(['%s'] * len(row))})",
        list(row.values()),
    )
    return str(row["id"])


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


BAD_CURSORS = ("not-a-cursor!!", b64(b"[1]"), b64(b'["yesterday", "x"]'), b64(b"{}"), "%%%")


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(platform: Components) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=platform.api_url, timeout=10) as c:
        yield c


@dataclass(frozen=True)
class Fleet:
    site: str
    key: str
    battery: str
    pv: str
    command_id: str


@pytest.fixture(scope="module")
def fleet(platform: Components, client: httpx.Client, tokens: dict[str, str]) -> Fleet:
    """A site with a battery and a PV inverter that have reported, and one queued command."""
    site = f"site-{uuid.uuid4().hex[:8]}"
    with psycopg.connect(platform.s.database_url, autocommit=True) as conn:
        key = create_key(conn, site)
    battery, pv = new_device(), new_device()
    ingest(platform, key, [reading(battery, site), pv_reading(pv, site)])
    wait_for_devices(client, tokens["viewer"], [battery, pv])
    r = client.post(
        "/api/v1/control/commands",
        headers=auth(tokens["operator"]),
        json={"device_id": battery, "command": "charge", "params": {"power_kw": 5}},
    )
    assert r.status_code == 202, r.text
    return Fleet(site=site, key=key, battery=battery, pv=pv, command_id=r.json()["id"])


@pytest.fixture(scope="module")
def bad_tokens(platform: Components, tokens: dict[str, str]) -> dict[str, str]:
    """Tokens the API must refuse, built from the layout of a real admin token."""
    claims = jwt.decode(tokens["admin"], options={"verify_signature": False})
    assert claims["extras"]["role"] == "admin"
    now = int(time.time())
    secret = platform.s.auth_token_secret
    viewer = tokens["viewer"].split(".")
    viewer_claims = jwt.decode(tokens["viewer"], options={"verify_signature": False})
    escalated = {**viewer_claims, "extras": {"role": "admin"}}
    tampered_payload = b64(json.dumps(escalated).encode())
    return {
        "forged": jwt.encode(
            {**claims, "iat": now, "exp": now + 3600}, "wrong-secret-" + "x" * 32, "HS256"
        ),
        "expired": jwt.encode({**claims, "iat": now - 7200, "exp": now - 60}, secret, "HS256"),
        "tampered": f"{viewer[0]}.{tampered_payload}.{viewer[2]}",
        "alg_none": jwt.encode({**claims, "iat": now, "exp": now + 3600}, "", algorithm="none"),
        "garbage": "not.a.jwt",
    }


@pytest.fixture()
def stranger(platform: Components) -> Iterator[httpx.Client]:
    """A client on a loopback address of its own, so its failed logins lock out no one else."""
    addr = f"127.{random.randint(1, 254)}.{random.randint(0, 254)}.{random.randint(1, 254)}"
    transport = httpx.HTTPTransport(local_address=addr)
    with httpx.Client(base_url=platform.api_url, transport=transport, timeout=10) as c:
        yield c


def make_user(db: psycopg.Connection, role: str = "viewer") -> tuple[str, str]:
    username = f"qa-{uuid.uuid4().hex[:12]}"
    password = f"pw-{uuid.uuid4().hex}"
    db.execute(
        "INSERT INTO users (username, role, password_hash) VALUES (%s, %s, %s)",
        (username, role, HASHER.hash(password)),
    )
    return username, password


# --- 1. auth matrix --------------------------------------------------------------------------

ALL = frozenset({"admin", "operator", "viewer"})
OPERATORS = frozenset({"admin", "operator"})
ADMINS = frozenset({"admin"})


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    allowed: frozenset[str]
    ok: int

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


ROUTES = [
    Route("GET", "/api/v1/devices", ALL, 200),
    Route("GET", "/api/v1/devices/{device}", ALL, 200),
    Route("GET", "/api/v1/devices/{device}/readings", ALL, 200),
    Route("GET", "/api/v1/alerts", ALL, 200),
    Route("GET", "/api/v1/alerts/groups", ALL, 200),
    Route("POST", "/api/v1/alerts/ack", OPERATORS, 202),
    Route("GET", "/api/v1/overview", ALL, 200),
    Route("GET", "/api/v1/control/catalogue", ALL, 200),
    Route("GET", "/api/v1/notifications", ALL, 200),
    Route("POST", "/api/v1/notifications/{notification}/ack", OPERATORS, 200),
    Route("GET", "/api/v1/control/commands", ALL, 200),
    Route("POST", "/api/v1/control/commands", OPERATORS, 202),
    Route("GET", "/api/v1/control/commands/{command}", ALL, 200),
    Route("GET", "/api/v1/alert-rules", ALL, 200),
    Route("POST", "/api/v1/alert-rules", ADMINS, 201),
    Route("GET", "/api/v1/alert-rules/{rule}", ALL, 200),
    Route("PUT", "/api/v1/alert-rules/{rule}", ADMINS, 200),
    Route("DELETE", "/api/v1/alert-rules/{rule}", ADMINS, 204),
]
BAD_CALLERS = ("anonymous", "forged", "expired", "tampered", "alg_none", "garbage")
CALLERS = (*BAD_CALLERS, "admin", "operator", "viewer")


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("route", ROUTES, ids=str)
def test_auth_matrix(
    route: Route,
    caller: str,
    client: httpx.Client,
    tokens: dict[str, str],
    bad_tokens: dict[str, str],
    fleet: Fleet,
    db: psycopg.Connection,
) -> None:
    path = route.path
    if "{notification}" in path:
        path = path.replace("{notification}", insert_notification(db))
    if "{rule}" in path:
        r = client.post("/api/v1/alert-rules", headers=auth(tokens["admin"]), json=threshold_rule())
        assert r.status_code == 201, r.text
        path = path.replace("{rule}", r.json()["id"])
    path = path.replace("{device}", fleet.battery).replace("{command}", fleet.command_id)
    body: dict[str, Any] | None = None
    if route.method in ("POST", "PUT") and "alert-rules" in path:
        body = threshold_rule()
    elif route.method == "POST" and path == "/api/v1/control/commands":
        body = {"device_id": fleet.battery, "command": "charge", "params": {"power_kw": 5}}
    elif path == "/api/v1/alerts/ack":
        body = {"ids": [f"al-{uuid.uuid4().hex}"]}  # none such: changes nothing either way

    headers = {} if caller == "anonymous" else auth({**tokens, **bad_tokens}[caller])
    before = written(db)
    r = client.request(route.method, path, headers=headers, json=body)

    if caller in BAD_CALLERS:
        assert_problem(r, 401)
    elif caller not in route.allowed:
        assert_problem(r, 403)
    else:
        assert r.status_code == route.ok, r.text
        return
    assert written(db) == before, "a refused request changed something"


def written(db: psycopg.Connection) -> tuple[Any, ...]:
    """What the API's writes touch: commands, rules (and their last change), acks."""
    row = db.execute(
        "SELECT (SELECT count(*) FROM command_requests),"
        " (SELECT count(*) FROM alert_rules), (SELECT max(updated_at) FROM alert_rules),"
        " (SELECT count(*) FROM notifications WHERE acked_at IS NOT NULL)"
    ).fetchone()
    assert row is not None
    return tuple(row)


# --- 2. login --------------------------------------------------------------------------------


def test_login_gives_each_demo_user_a_working_bearer_token(
    platform: Components, client: httpx.Client
) -> None:
    s = platform.s
    for role, username, password in (
        ("admin", s.auth_admin_username, s.auth_admin_password),
        ("operator", s.auth_operator_username, s.auth_operator_password),
        ("viewer", s.auth_viewer_username, s.auth_viewer_password),
    ):
        r = client.post("/api/v1/auth/login", json={"username": username, "password": password})
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"access_token", "token_type", "expires_in", "role"}
        assert body["token_type"] == "Bearer"
        assert body["expires_in"] == s.auth_token_ttl_s
        assert body["role"] == role
        claims = jwt.decode(body["access_token"], s.auth_token_secret, algorithms=["HS256"])
        assert claims["sub"] == username
        assert claims["extras"]["role"] == role
        assert client.get("/api/v1/devices", headers=auth(body["access_token"])).status_code == 200


def test_wrong_password_and_unknown_user_are_401_problems(
    stranger: httpx.Client, db: psycopg.Connection
) -> None:
    username, password = make_user(db)
    wrong = stranger.post("/api/v1/auth/login", json={"username": username, "password": "nope"})
    unknown = stranger.post(
        "/api/v1/auth/login", json={"username": f"ghost-{uuid.uuid4().hex}", "password": "x"}
    )
    assert assert_problem(wrong, 401)["title"] == assert_problem(unknown, 401)["title"]
    ok = stranger.post("/api/v1/auth/login", json={"username": username, "password": password})
    assert ok.status_code == 200, ok.text
    assert ok.json()["role"] == "viewer"


def test_repeated_failures_lock_the_username_out(
    platform: Components, stranger: httpx.Client, db: psycopg.Connection
) -> None:
    username, password = make_user(db, role="operator")
    other, other_password = make_user(db)
    limit = platform.s.login_max_failures
    for _ in range(limit):
        r = stranger.post("/api/v1/auth/login", json={"username": username, "password": "bad"})
        assert_problem(r, 401)
    for attempt in ("bad", password):
        r = stranger.post("/api/v1/auth/login", json={"username": username, "password": attempt})
        assert_problem(r, 429)
        assert 1 <= int(r.headers["Retry-After"]) <= platform.s.login_lockout_s
    # The lockout is per username: someone else still logs in from the same address.
    r = stranger.post("/api/v1/auth/login", json={"username": other, "password": other_password})
    assert r.status_code == 200, r.text


def test_login_body_is_validated(client: httpx.Client) -> None:
    for body in ({"username": "admin"}, {"username": "", "password": "x"}, ["admin", "x"]):
        r = client.post("/api/v1/auth/login", json=body)
        assert r.status_code in (400, 422), r.text
        assert r.headers["content-type"].startswith(PROBLEM_JSON)


# --- 3. devices and readings -----------------------------------------------------------------


def test_devices_are_projected_and_filtered(
    platform: Components,
    client: httpx.Client,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
) -> None:
    batteries = sorted(new_device() for _ in range(3))
    pvs = sorted(new_device() for _ in range(2))
    elsewhere = new_device()
    other_site = f"site-{uuid.uuid4().hex[:8]}"
    ingest(
        platform,
        device_key,
        [reading(d, site, seq=3, soc_pct=61.5, power_kw=-2.25) for d in batteries]
        + [pv_reading(d, site, power_kw=4.75) for d in pvs],
    )
    ingest(platform, create_key(db, other_site), [reading(elsewhere, other_site)])
    viewer = tokens["viewer"]
    wait_for_devices(client, viewer, [*batteries, *pvs, elsewhere])

    items, _ = collect(client, "/api/v1/devices", viewer, site_id=site)
    assert [d["device_id"] for d in items] == sorted(batteries + pvs)
    assert {d["site_id"] for d in items} == {site}
    assert {d["status"] for d in items} == {"online"}

    paged, pages = collect(client, "/api/v1/devices", viewer, site_id=site, limit=2)
    assert paged == items
    assert pages == 3

    for device_type, expected in (("battery", batteries), ("pv_inverter", pvs), ("meter", [])):
        items, _ = collect(client, "/api/v1/devices", viewer, site_id=site, device_type=device_type)
        assert [d["device_id"] for d in items] == expected
        assert {d["device_type"] for d in items} <= {device_type}

    everywhere, _ = collect(client, "/api/v1/devices", viewer, device_type="pv_inverter", limit=500)
    assert {d["device_type"] for d in everywhere} == {"pv_inverter"}
    assert set(pvs) <= {d["device_id"] for d in everywhere}
    assert elsewhere not in {d["device_id"] for d in everywhere}

    online, _ = collect(client, "/api/v1/devices", viewer, site_id=site, status="online")
    assert len(online) == 5
    offline, _ = collect(client, "/api/v1/devices", viewer, site_id=site, status="offline")
    assert offline == []

    r = client.get(f"/api/v1/devices/{batteries[0]}", headers=auth(viewer))
    assert r.status_code == 200
    detail = r.json()
    assert detail["device_id"] == batteries[0]
    assert detail["site_id"] == site
    assert detail["device_type"] == "battery"
    assert detail["status"] == "online"
    assert detail["latest"]["soc_pct"] == 61.5
    assert detail["latest"]["power_kw"] == -2.25
    assert detail["latest"]["voltage_v"] is None

    missing = client.get(f"/api/v1/devices/{new_device()}", headers=auth(viewer))
    assert_problem(missing, 404)


def test_readings_are_downsampled_into_buckets(
    platform: Components,
    client: httpx.Client,
    tokens: dict[str, str],
    site: str,
    device_key: str,
) -> None:
    device = new_device()
    start = (datetime.now(UTC) - timedelta(seconds=125)).replace(microsecond=0)
    power = [float((i * 37) % 101 - 50) for i in range(120)]
    soc = [20.0 + i * 0.5 for i in range(120)]
    sent = [
        reading(
            device,
            site,
            seq=i,
            ts=(start + timedelta(seconds=i)).isoformat(),
            power_kw=power[i],
            soc_pct=soc[i],
        )
        for i in range(120)
    ]
    random.shuffle(sent)
    ingest(platform, device_key, sent)
    viewer = tokens["viewer"]
    path = f"/api/v1/devices/{device}/readings"
    window = {"from": start.isoformat(), "to": (start + timedelta(seconds=120)).isoformat()}

    def series(**params: Any) -> dict[str, Any]:
        r = client.get(path, params={**window, **params}, headers=auth(viewer))
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    wait_for(
        lambda: sum(b["count"] for b in series(points=4)["points"]) == 120,
        30,
        "120 readings in the series",
    )
    body = series(points=4)
    assert body["device_id"] == device
    assert body["bucket_s"] == 30
    buckets = body["points"]
    assert 1 <= len(buckets) <= 4
    assert sum(b["count"] for b in buckets) == 120
    for k, b in enumerate(buckets):
        assert datetime.fromisoformat(b["t"]) == start + timedelta(seconds=30 * k)
        assert b["count"] == 30
        assert set(b["metrics"]) == {"power_kw", "soc_pct"}
        for metric, values in (("power_kw", power), ("soc_pct", soc)):
            stat = b["metrics"][metric]
            chunk = values[30 * k : 30 * (k + 1)]
            assert stat["min"] <= stat["avg"] <= stat["max"]
            assert (stat["min"], stat["max"]) == (min(chunk), max(chunk))
            assert stat["avg"] == pytest.approx(sum(chunk) / len(chunk))
    assert min(b["metrics"]["power_kw"]["min"] for b in buckets) == min(power)
    assert max(b["metrics"]["power_kw"]["max"] for b in buckets) == max(power)

    only_power = series(points=1, metrics="power_kw")
    assert only_power["bucket_s"] == 120
    [single] = only_power["points"]
    assert single["count"] == 120
    assert set(single["metrics"]) == {"power_kw"}
    assert single["metrics"]["power_kw"]["avg"] == pytest.approx(sum(power) / 120)

    iso = start.isoformat()
    later = (start + timedelta(seconds=60)).isoformat()
    invalid: list[dict[str, str | int]] = [
        {"from": iso, "to": iso},
        {"from": later, "to": iso},
        {"from": iso, "to": later, "metrics": "power_kw,bogus_metric"},
        {"from": iso, "to": later, "metrics": "password"},
        {"from": "2024-01-01T00:00:00", "to": "2024-01-01T01:00:00"},
        {"from": "2024-01-01T00:00:00Z", "to": "2025-01-02T00:00:00Z"},
        {"from": "yesterday", "to": later},
        {"from": iso, "to": later, "points": 0},
    ]
    for params in invalid:
        assert_problem(client.get(path, params=params, headers=auth(viewer)), 400)


# --- 4. pagination ---------------------------------------------------------------------------


def test_alerts_paginate_in_order_without_repeats(
    client: httpx.Client, tokens: dict[str, str], db: psycopg.Connection
) -> None:
    tag = uuid.uuid4().hex[:8]
    site, other_site = f"site-{tag}", f"site-{tag}-x"
    devices = [f"dev-{tag}-a", f"dev-{tag}-b"]
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    tie = base + timedelta(seconds=10, microseconds=123456)
    rows = [
        (f"al-{tag}-{i:03d}", devices[i % 2], site, SEVERITIES[i % 4], ALERT_STATUSES[i % 3], ts)
        for i, ts in enumerate(
            [base + timedelta(seconds=i) for i in range(23)] + [tie] * 7,
        )
    ]
    decoys = [
        (f"al-{tag}-x{i}", f"dev-{tag}-x", other_site, "critical", "cleared", tie) for i in range(3)
    ]
    shuffled = rows + decoys
    random.shuffle(shuffled)
    for alert_id, device, site_id, severity, status, opened_at in shuffled:
        db.execute(
            "INSERT INTO alerts (id, rule_id, device_id, site_id, severity, status, message,"
            " value, opened_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (alert_id, uuid.uuid4(), device, site_id, severity, status, "too hot", 81.5, opened_at),
        )
    expected = sorted(rows, key=lambda r: (r[5], r[0]), reverse=True)
    viewer = tokens["viewer"]

    items, pages = collect(client, "/api/v1/alerts", viewer, site_id=site, limit=5)
    ids = [a["id"] for a in items]
    assert ids == [r[0] for r in expected]
    assert len(set(ids)) == 30
    assert pages == 6
    first = items[0]
    assert first["device_id"] in devices
    assert first["site_id"] == site
    assert first["message"] == "too hot"
    assert first["value"] == 81.5
    assert datetime.fromisoformat(first["opened_at"]) == expected[0][5]

    filters: list[tuple[dict[str, Any], Callable[[tuple[Any, ...]], bool]]] = [
        ({"status": "cleared"}, lambda r: r[4] == "cleared"),
        ({"status": "open"}, lambda r: r[4] != "cleared"),
        ({"severity": "minor"}, lambda r: r[3] == "minor"),
        ({"device_id": devices[1]}, lambda r: r[1] == devices[1]),
        (
            {"device_id": devices[0], "status": "active_unacknowledged"},
            lambda r: r[1] == devices[0] and r[4] == "active_unacknowledged",
        ),
    ]
    for extra, keep in filters:
        want = [r[0] for r in expected if keep(r)]
        assert want, extra
        got, _ = collect(client, "/api/v1/alerts", viewer, site_id=site, limit=3, **extra)
        assert [a["id"] for a in got] == want, extra

    by_device, _ = collect(client, "/api/v1/alerts", viewer, device_id=f"dev-{tag}-x", limit=2)
    assert [a["id"] for a in by_device] == [f"al-{tag}-x{i}" for i in (2, 1, 0)]


def test_notifications_paginate_and_filter_unread(
    client: httpx.Client, tokens: dict[str, str], db: psycopg.Connection
) -> None:
    tag = uuid.uuid4().hex[:8]
    site = f"site-{tag}"
    devices = [f"dev-{tag}-a", f"dev-{tag}-b", f"dev-{tag}-c"]
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=30)
    tie = base + timedelta(seconds=3, microseconds=500)
    rows: list[dict[str, Any]] = []
    for i in range(21):
        acked = i % 3 == 0
        rows.append(
            {
                "id": f"nt-{tag}-{i:03d}",
                "device_id": devices[i % 3],
                "site_id": site,
                "severity": SEVERITIES[i % 4],
                "created_at": tie if i >= 16 else base + timedelta(seconds=i),
                "acked_at": base + timedelta(minutes=1) if acked else None,
                "acked_by": "someone" if acked else None,
            }
        )
    for row in random.sample(rows, len(rows)):
        insert_notification(db, **row)
    expected = sorted(rows, key=lambda r: (r["created_at"], r["id"]), reverse=True)
    viewer = tokens["viewer"]

    items, pages = collect(client, "/api/v1/notifications", viewer, site_id=site, limit=5)
    assert [n["id"] for n in items] == [r["id"] for r in expected]
    assert len({n["id"] for n in items}) == 21
    assert pages == 5
    assert [n["read"] for n in items] == [r["acked_at"] is not None for r in expected]

    cases: list[tuple[dict[str, Any], list[str]]] = [
        ({"unread": True}, [r["id"] for r in expected if r["acked_at"] is None]),
        ({"unread": False}, [r["id"] for r in expected if r["acked_at"] is not None]),
        ({"severity": "critical"}, [r["id"] for r in expected if r["severity"] == "critical"]),
        ({"device_id": devices[2]}, [r["id"] for r in expected if r["device_id"] == devices[2]]),
        (
            {"device_id": devices[1], "unread": True},
            [r["id"] for r in expected if r["device_id"] == devices[1] and not r["acked_at"]],
        ),
    ]
    for extra, want in cases:
        assert want, extra
        got, _ = collect(client, "/api/v1/notifications", viewer, site_id=site, limit=4, **extra)
        assert [n["id"] for n in got] == want, extra
        if extra.get("unread") is True:
            assert not any(n["read"] for n in got)


@pytest.mark.parametrize(
    "path",
    ["/api/v1/devices", "/api/v1/alerts", "/api/v1/notifications", "/api/v1/control/commands"],
)
def test_bad_cursor_is_a_400_problem(
    path: str, client: httpx.Client, tokens: dict[str, str]
) -> None:
    for cursor in BAD_CURSORS:
        r = client.get(path, params={"cursor": cursor}, headers=auth(tokens["viewer"]))
        assert_problem(r, 400)


# --- 5. notification ack ---------------------------------------------------------------------


def test_ack_marks_read_once(
    platform: Components, client: httpx.Client, tokens: dict[str, str], db: psycopg.Connection
) -> None:
    notification = insert_notification(db)
    path = f"/api/v1/notifications/{notification}/ack"

    assert_problem(client.post(path, headers=auth(tokens["viewer"])), 403)
    r = client.post(path, headers=auth(tokens["operator"]))
    assert r.status_code == 200, r.text
    first = r.json()
    assert first["id"] == notification
    assert first["read"] is True
    assert first["acked_by"] == platform.s.auth_operator_username
    acked_at = datetime.fromisoformat(first["acked_at"])
    assert abs(datetime.now(UTC) - acked_at) < timedelta(seconds=30)

    again = client.post(path, headers=auth(tokens["admin"]))
    assert again.status_code == 200, again.text
    assert again.json()["acked_at"] == first["acked_at"]
    assert again.json()["acked_by"] == platform.s.auth_operator_username

    site = first["site_id"]
    [listed] = collect(client, "/api/v1/notifications", tokens["viewer"], site_id=site)[0]
    assert listed["read"] is True
    assert listed["acked_by"] == platform.s.auth_operator_username
    unread = collect(client, "/api/v1/notifications", tokens["viewer"], site_id=site, unread=True)
    assert unread[0] == []

    missing = f"/api/v1/notifications/nt-{uuid.uuid4().hex}/ack"
    assert_problem(client.post(missing, headers=auth(tokens["operator"])), 404)


# --- 6. control commands ---------------------------------------------------------------------


def test_command_is_queued_with_history(
    platform: Components, client: httpx.Client, tokens: dict[str, str], fleet: Fleet
) -> None:
    r = client.post(
        "/api/v1/control/commands",
        headers=auth(tokens["operator"]),
        json={"device_id": fleet.battery, "command": "charge", "params": {"power_kw": 5}},
    )
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert set(accepted) == {"id", "status"}
    assert accepted["status"] == "queued"
    uuid.UUID(accepted["id"])

    r = client.get(f"/api/v1/control/commands/{accepted['id']}", headers=auth(tokens["viewer"]))
    assert r.status_code == 200, r.text
    command = r.json()
    assert command["id"] == accepted["id"]
    assert command["device_id"] == fleet.battery
    assert command["command"] == "charge"
    assert command["params"] == {"power_kw": 5}
    assert command["requested_by"] == platform.s.auth_operator_username
    assert command["status"] in ("queued", "processing")  # the controller may have taken it
    assert command["ttl_s"] == 60
    first = command["history"][0]
    assert first["status"] == "queued"
    assert abs(datetime.now(UTC) - datetime.fromisoformat(first["at"])) < timedelta(seconds=30)

    unknown = f"/api/v1/control/commands/{uuid.uuid4()}"
    assert_problem(client.get(unknown, headers=auth(tokens["viewer"])), 404)


def test_invalid_commands_are_refused(
    client: httpx.Client, tokens: dict[str, str], fleet: Fleet
) -> None:
    def send(body: dict[str, Any]) -> httpx.Response:
        return client.post("/api/v1/control/commands", headers=auth(tokens["operator"]), json=body)

    battery, pv = fleet.battery, fleet.pv
    cases: list[tuple[dict[str, Any], str]] = [
        ({"device_id": battery, "command": "limit_power", "params": {"limit_pct": 50}}, "command"),
        ({"device_id": pv, "command": "charge", "params": {"power_kw": 5}}, "command"),
        ({"device_id": battery, "command": "charge", "params": {"power_kw": 0}}, "params.power_kw"),
        (
            {"device_id": battery, "command": "charge", "params": {"power_kw": 1e6}},
            "params.power_kw",
        ),
        ({"device_id": battery, "command": "charge", "params": {}}, "params.power_kw"),
        (
            {"device_id": battery, "command": "charge", "params": {"power_kw": "5"}},
            "params.power_kw",
        ),
        (
            {"device_id": battery, "command": "charge", "params": {"power_kw": True}},
            "params.power_kw",
        ),
        (
            {"device_id": battery, "command": "charge", "params": {"power_kw": 5, "turbo": 1}},
            "params.turbo",
        ),
        (
            {"device_id": pv, "command": "limit_power", "params": {"limit_pct": 101}},
            "params.limit_pct",
        ),
        ({"device_id": pv, "command": "reboot", "params": {"now": 1}}, "params.now"),
    ]
    for body, field in cases:
        r = send(body)
        assert field in error_fields(r), (body, r.text)

    # The same checks let valid commands through, for every device type's command set.
    assert send({"device_id": pv, "command": "limit_power", "params": {"limit_pct": 0}}).is_success
    assert send({"device_id": battery, "command": "reboot"}).status_code == 202

    assert_problem(send({"device_id": new_device(), "command": "reboot"}), 404)
    unknown_field = send({"device_id": battery, "command": "reboot", "urgent": True})
    assert unknown_field.status_code in (400, 422), unknown_field.text
    assert unknown_field.headers["content-type"].startswith(PROBLEM_JSON)
    for body in ({"device_id": battery}, {"device_id": battery, "command": "reboot", "ttl_s": 0}):
        r = send(body)
        assert r.status_code in (400, 422), r.text


def test_idempotency_key_and_device_filter(
    platform: Components,
    client: httpx.Client,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
) -> None:
    device = new_device()
    ingest(platform, device_key, [reading(device, site)])
    wait_for_devices(client, tokens["viewer"], [device])
    key = f"idem-{uuid.uuid4().hex}"
    body = {"device_id": device, "command": "discharge", "params": {"power_kw": 2.5}}
    headers = {**auth(tokens["operator"]), "Idempotency-Key": key}

    first = client.post("/api/v1/control/commands", headers=headers, json=body)
    retry = client.post("/api/v1/control/commands", headers=headers, json=body)
    assert first.status_code == 202, first.text
    assert retry.status_code == 202, retry.text
    assert retry.json()["id"] == first.json()["id"]
    row = db.execute(
        "SELECT count(*) FROM command_requests WHERE idempotency_key = %s", (key,)
    ).fetchone()
    assert row == (1,)
    wait_for(  # the read model shows it once the controller took it
        lambda: (
            db.execute(
                "SELECT count(*) FROM control_commands WHERE id = %s", (first.json()["id"],)
            ).fetchone()
            == (1,)
        ),
        10,
        "the command in the read model",
    )

    ids = [first.json()["id"]]
    for power in (1.0, 3.0, 4.0):
        r = client.post(
            "/api/v1/control/commands",
            headers=auth(tokens["admin"]),
            json={**body, "params": {"power_kw": power}},
        )
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    items = wait_for(  # the list is the read model: each shows once the controller took it
        lambda: (
            len(
                got := collect(
                    client, "/api/v1/control/commands", tokens["viewer"], device_id=device
                )[0]
            )
            == 4
            and got
        ),
        10,
        "four commands listed",
    )
    assert [c["id"] for c in items] == ids[::-1]
    assert {c["device_id"] for c in items} == {device}
    paged, pages = collect(
        client, "/api/v1/control/commands", tokens["viewer"], device_id=device, limit=3
    )
    assert [c["id"] for c in paged] == [c["id"] for c in items]  # statuses move on
    assert pages == 2
    # the controller takes each command from queued to processing (nobody answers within the test)
    wait_for(
        lambda: (
            len(
                collect(
                    client,
                    "/api/v1/control/commands",
                    tokens["viewer"],
                    device_id=device,
                    status="processing",
                )[0]
            )
            == 4
        ),
        15,
        "commands to be processing",
    )
    queued, _ = collect(
        client, "/api/v1/control/commands", tokens["viewer"], device_id=device, status="queued"
    )
    assert queued == []
    failed, _ = collect(
        client, "/api/v1/control/commands", tokens["viewer"], device_id=device, status="failed"
    )
    assert failed == []


# --- 7. alert rules --------------------------------------------------------------------------


def test_alert_rule_lifecycle(client: httpx.Client, tokens: dict[str, str], fleet: Fleet) -> None:
    admin = auth(tokens["admin"])
    specs = [
        threshold_rule(scope={"site_id": fleet.site}),
        threshold_rule(
            op="outside",
            threshold=None,
            clear_threshold=None,
            low=49.5,
            high=50.5,
            metric="frequency_hz",
            scope={"device_id": fleet.battery},
        ),
        {
            "name": "soc dropping fast",
            "kind": "rate_of_change",
            "metric": "soc_pct",
            "op": "lt",
            "threshold": 0.5,
            "window_s": 60,
            "for_s": 0,
            "severity": "warning",
            "scope": {"device_type": "battery"},
        },
        {"name": "silent device", "kind": "offline", "silent_s": 300, "severity": "critical"},
    ]
    created: list[dict[str, Any]] = []
    for spec in specs:
        r = client.post("/api/v1/alert-rules", headers=admin, json=spec)
        assert r.status_code == 201, r.text
        rule = r.json()
        uuid.UUID(rule["id"])
        for field, value in spec.items():
            assert rule[field] == value, field
        assert rule["enabled"] is spec.get("enabled", True)
        created.append(rule)

    listed, _ = collect(client, "/api/v1/alert-rules", tokens["viewer"], unpaged=True)
    assert {r["id"] for r in created} <= {r["id"] for r in listed}
    assert [r["name"] for r in listed] == sorted(r["name"] for r in listed)

    rule_id = created[0]["id"]
    path = f"/api/v1/alert-rules/{rule_id}"
    replacement = {
        "name": "cold battery",
        "kind": "threshold",
        "metric": "temperature_c",
        "op": "lt",
        "threshold": -10.0,
        "severity": "minor",
        "enabled": True,
    }
    r = client.put(path, headers=admin, json=replacement)
    assert r.status_code == 200, r.text
    got = client.get(path, headers=auth(tokens["viewer"]))
    assert got.status_code == 200
    rule = got.json()
    assert rule["id"] == rule_id
    for field, value in replacement.items():
        assert rule[field] == value, field
    assert "clear_threshold" not in rule
    assert "for_s" not in rule
    assert rule["scope"] == {}
    assert rule["created_at"] == created[0]["created_at"]

    assert client.delete(path, headers=admin).status_code == 204
    assert_problem(client.get(path, headers=auth(tokens["viewer"])), 404)
    assert_problem(client.delete(path, headers=admin), 404)
    assert_problem(client.put(path, headers=admin, json=replacement), 404)


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        pytest.param(threshold_rule(op=None), "op", id="threshold without op"),
        pytest.param(
            threshold_rule(op="outside", threshold=None, clear_threshold=None, low=5.0, high=5.0),
            "low",
            id="outside with low>=high",
        ),
        pytest.param(
            threshold_rule(op="outside", threshold=None, clear_threshold=None, low=9.0, high=1.0),
            "low",
            id="outside with low>high",
        ),
        pytest.param(threshold_rule(silent_s=60), "silent_s", id="silent_s on threshold"),
        pytest.param(threshold_rule(clear_threshold=90.0), "clear_threshold", id="gt clear above"),
        pytest.param(
            threshold_rule(op="lt", threshold=10.0, clear_threshold=5.0),
            "clear_threshold",
            id="lt clear below",
        ),
        pytest.param(threshold_rule(threshold=None), "threshold", id="gt without threshold"),
        pytest.param(threshold_rule(metric="password"), "metric", id="unknown metric"),
        pytest.param(threshold_rule(window_s=60), "window_s", id="window_s on threshold"),
        pytest.param(
            threshold_rule(scope={"site_id": "a", "device_id": "b"}), "scope", id="two scopes"
        ),
        pytest.param(
            {"name": "x", "kind": "offline", "severity": "major"},
            "silent_s",
            id="offline no silent",
        ),
        pytest.param(
            {
                "name": "x",
                "kind": "offline",
                "severity": "major",
                "silent_s": 9,
                "metric": "soc_pct",
            },
            "metric",
            id="metric on offline",
        ),
        pytest.param(
            {
                "name": "x",
                "kind": "rate_of_change",
                "metric": "soc_pct",
                "op": "gt",
                "threshold": 1,
                "severity": "major",
            },
            "window_s",
            id="rate without window",
        ),
        pytest.param(
            {
                "name": "x",
                "kind": "rate_of_change",
                "metric": "soc_pct",
                "op": "outside",
                "threshold": 1,
                "window_s": 5,
                "severity": "major",
            },
            "op",
            id="rate outside",
        ),
    ],
)
def test_invalid_alert_rules_name_the_field(
    spec: dict[str, Any], field: str, client: httpx.Client, tokens: dict[str, str]
) -> None:
    admin = auth(tokens["admin"])
    r = client.post("/api/v1/alert-rules", headers=admin, json=spec)
    assert field in error_fields(r), r.text
    good = client.post("/api/v1/alert-rules", headers=admin, json=threshold_rule())
    assert good.status_code == 201
    r = client.put(f"/api/v1/alert-rules/{good.json()['id']}", headers=admin, json=spec)
    assert field in error_fields(r), r.text


# --- 8. hostile filter values ----------------------------------------------------------------

HOSTILE = [
    "' OR 1=1 --",
    "'; DROP TABLE devices; --",
    '" OR ""="',
    "ünïcødé ☃ 設備",
    "%",
    "_",
    "\\",
    "*",
    "1) OR (1=1",
    "$1",
    "%(site_id)s",
    "{}",
    "x" * 2000,
]
STRING_FILTERS = [
    ("/api/v1/devices", "site_id"),
    ("/api/v1/alerts", "device_id"),
    ("/api/v1/alerts", "site_id"),
    ("/api/v1/notifications", "device_id"),
    ("/api/v1/notifications", "site_id"),
    ("/api/v1/control/commands", "device_id"),
    ("/api/v1/control/commands", "status"),
]
REFUSED_FILTERS = [  # enums and cursors: the document says what they take
    ("/api/v1/devices", "status"),
    ("/api/v1/devices", "device_type"),
    ("/api/v1/alerts", "status"),
    ("/api/v1/alerts", "severity"),
    ("/api/v1/alerts", "rule_id"),
    ("/api/v1/notifications", "severity"),
    ("/api/v1/notifications", "unread"),
    ("/api/v1/devices", "cursor"),
    ("/api/v1/alerts", "cursor"),
    ("/api/v1/notifications", "cursor"),
    ("/api/v1/control/commands", "cursor"),
]


@pytest.mark.parametrize("value", HOSTILE, ids=lambda v: repr(v[:20]))
def test_hostile_filter_values_are_harmless(
    value: str,
    client: httpx.Client,
    tokens: dict[str, str],
    db: psycopg.Connection,
    fleet: Fleet,
) -> None:
    viewer = auth(tokens["viewer"])
    devices_before = db.execute("SELECT count(*) FROM devices").fetchone()
    for path, param in STRING_FILTERS:
        r = client.get(path, params={param: value}, headers=viewer)
        assert r.status_code == 200, (path, param, r.text)
        assert r.json() == {"items": [], "next_cursor": None}, (path, param)
    for path, param in REFUSED_FILTERS:
        assert_problem(client.get(path, params={param: value}, headers=viewer), 400)

    quoted = quote(value, safe="")
    assert_problem(client.get(f"/api/v1/devices/{quoted}", headers=viewer), 404)
    r = client.get(f"/api/v1/devices/{quoted}/readings", headers=viewer)
    assert r.status_code == 200, r.text
    assert r.json()["points"] == []
    readings = f"/api/v1/devices/{fleet.battery}/readings"
    assert_problem(client.get(readings, params={"metrics": value}, headers=viewer), 400)
    ack = client.post(f"/api/v1/notifications/{quoted}/ack", headers=auth(tokens["operator"]))
    assert_problem(ack, 404)

    for table in CONTRACT_TABLES:
        row = db.execute("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()
        assert row == (True,), table
    assert db.execute("SELECT count(*) FROM devices").fetchone() == devices_before
    assert client.get(f"/api/v1/devices/{fleet.battery}", headers=viewer).status_code == 200


# --- 9. operations endpoints -----------------------------------------------------------------


def test_health_and_readiness_need_no_token(client: httpx.Client) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}

    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"] == {"kafka": "ok", "postgres": "ok", "redis": "ok"}


def test_metrics_count_requests(client: httpx.Client, tokens: dict[str, str]) -> None:
    assert client.get("/api/v1/alerts", headers=auth(tokens["viewer"])).status_code == 200
    r = client.get("/metrics")
    assert r.status_code == 200
    lines = [ln for ln in r.text.splitlines() if ln.startswith("microgrid_requests_total")]
    assert lines, r.text[:2000]
    assert any("/api/v1/alerts" in ln for ln in lines), lines


def test_openapi_document_is_public(client: httpx.Client) -> None:
    r = client.get("/docs/openapi.json")
    assert r.status_code == 200, r.text
    spec = r.json()
    assert spec["openapi"].startswith("3.")
    for path in ("/api/v1/devices", "/api/v1/auth/login", "/api/v1/alert-rules"):
        assert path in spec["paths"], path


# --- 10. CORS --------------------------------------------------------------------------------


def test_cors_preflight_allows_only_the_public_origin(
    platform: Components, client: httpx.Client
) -> None:
    def preflight(origin: str) -> httpx.Response:
        return client.options(
            "/api/v1/devices",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
        )

    allowed = preflight(platform.s.public_origin)
    assert allowed.status_code in (200, 204), allowed.text
    assert allowed.headers["access-control-allow-origin"] == platform.s.public_origin
    assert "GET" in allowed.headers["access-control-allow-methods"]
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()

    refused = preflight("https://evil.example.com")
    assert "access-control-allow-origin" not in refused.headers
