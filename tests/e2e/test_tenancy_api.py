"""Users of the query API scoped to sites (issue 15), against the real processes: a viewer and
an operator of site A, and the resources of site B (devices, readings, alerts, notifications,
commands, alert rules, live events) that they must neither see nor act on; the same requests
succeeding for site A and for an admin; scope changes taking effect within the 5 s cache; and
the admin routes of the device registry."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from query_api.auth import HASHER
from query_api.users import USER_CACHE_S
from runtime.db import migrate
from runtime.devices import register_device
from runtime.keys import create_key
from runtime.settings import Settings
from tests.conftest import Components, free_port, wait_for
from tests.e2e.test_query_api import PROBLEM_JSON, assert_problem, auth
from tests.outages import PrivatePostgres
from tests.sse import SSEClient
from tests.support import new_device

SCOPE_WAIT_S = USER_CACHE_S + 5  # a change of users must show within the cache time


def ids(r: httpx.Response, field: str = "id") -> set[str]:
    assert r.status_code == 200, r.text
    return {item[field] for item in r.json()["items"]}


def send(platform: Components, key: str, device: str, site: str, **metrics: float) -> None:
    body = {
        "device_id": device,
        "site_id": site,
        "device_type": "battery",
        "ts": datetime.now(UTC).isoformat(),
        "soc_pct": 50.0,
        **metrics,
    }
    r = httpx.post(
        f"{platform.gateway_url}/api/v1/telemetry", json=body, headers=auth(key), timeout=10
    )
    assert r.status_code == 202, r.text


def make_user(db: psycopg.Connection, role: str, sites: list[str] | None) -> str:
    """A user with this role and sites (None: every site); its password is its name."""
    username = f"qa-{role}-{uuid.uuid4().hex[:10]}"
    db.execute(
        "INSERT INTO users (username, role, password_hash, sites) VALUES (%s, %s, %s, %s)",
        (username, role, HASHER.hash(username), sites),
    )
    return username


def login(client: httpx.Client, username: str) -> str:
    r = client.post("/api/v1/auth/login", json={"username": username, "password": username})
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


def outbox_rows(db: psycopg.Connection, device: str) -> int:
    row = db.execute("SELECT count(*) FROM outbox WHERE key = %s", (device.encode(),)).fetchone()
    assert row is not None
    return int(row[0])


@dataclass(frozen=True)
class Site:
    name: str
    key: str
    device: str
    rule: str  # a threshold rule scoped to the device
    site_rule: str  # a rule scoped to the site
    alert: str
    notification: str
    command: str


@dataclass(frozen=True)
class World:
    a: Site
    b: Site
    global_rule: str
    viewer: str  # tokens of users scoped to site A
    operator: str
    viewer_name: str
    operator_name: str


@pytest.fixture(scope="module")
def client(platform: Components) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=platform.api_url, timeout=15) as c:
        yield c


def rule(client: httpx.Client, admin: str, scope: dict[str, str], **spec: Any) -> str:
    body = {
        "name": f"tenancy {uuid.uuid4().hex[:6]}",
        "kind": "threshold",
        "metric": "temperature_c",
        "op": "gt",
        "threshold": 75.0,
        "clear_threshold": 70.0,
        "for_s": 0.0,
        "severity": "major",
        "scope": scope,
        **spec,
    }
    r = client.post("/api/v1/alert-rules", headers=auth(admin), json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def make_site(
    platform: Components, client: httpx.Client, db: psycopg.Connection, admin: str
) -> Site:
    """A site with a registered battery that reported, a rule that opened an alert (with its
    notification) on it, and a command for it."""
    name = f"site-{uuid.uuid4().hex[:8]}"
    key = create_key(db, name)
    device = new_device()
    register_device(db, device, name, "test")
    send(platform, key, device, name, temperature_c=20.0)
    wait_for(
        lambda: client.get(f"/api/v1/devices/{device}", headers=auth(admin)).status_code == 200,
        30,
        f"device {device} in the query API",
    )
    rule_id = rule(client, admin, {"device_id": device})
    site_rule = rule(client, admin, {"site_id": name}, enabled=False)
    last = [0.0]

    def opened() -> Any:
        row = db.execute("SELECT id FROM alerts WHERE rule_id = %s", (rule_id,)).fetchone()
        if row is None and time.monotonic() - last[0] >= 0.5:
            send(platform, key, device, name, temperature_c=90.0)  # until the rule is applied
            last[0] = time.monotonic()
        return row[0] if row else None

    alert = wait_for(opened, 30, f"an alert on {device}")
    notification = wait_for(
        lambda: db.execute("SELECT id FROM notifications WHERE alert_id = %s", (alert,)).fetchone(),
        15,
        "its notification",
    )[0]
    r = client.post(
        "/api/v1/control/commands",
        headers=auth(admin),
        json={"device_id": device, "command": "charge", "params": {"power_kw": 5}},
    )
    assert r.status_code == 202, r.text
    return Site(name, key, device, rule_id, site_rule, alert, notification, r.json()["id"])


@pytest.fixture(scope="module")
def world(platform: Components, client: httpx.Client, tokens: dict[str, str]) -> World:
    admin = tokens["admin"]
    with psycopg.connect(platform.s.database_url, autocommit=True) as db:
        a = make_site(platform, client, db, admin)
        b = make_site(platform, client, db, admin)
        viewer = make_user(db, "viewer", [a.name])
        operator = make_user(db, "operator", [a.name, f"site-{uuid.uuid4().hex[:8]}"])
        global_rule = rule(client, admin, {"device_type": "battery"}, enabled=False)
        commands = [a.command, b.command]
        wait_for(  # the commands are in the read model (the controller took them)
            lambda: (
                db.execute(
                    "SELECT count(*) = 2 FROM control_commands WHERE id::text = ANY(%s)",
                    (commands,),
                ).fetchone()
                == (True,)
            ),
            15,
            "the commands in the read model",
        )
    return World(
        a, b, global_rule, login(client, viewer), login(client, operator), viewer, operator
    )


# --- reads -----------------------------------------------------------------------------------


def test_lists_hold_only_the_users_sites(
    client: httpx.Client, tokens: dict[str, str], world: World
) -> None:
    a, b = world.a, world.b
    for token in (world.viewer, world.operator):
        h = auth(token)
        devices = ids(client.get("/api/v1/devices", params={"limit": 500}, headers=h), "device_id")
        assert a.device in devices
        assert b.device not in devices
        assert {d["site_id"] for d in client.get("/api/v1/devices", headers=h).json()["items"]} <= {
            a.name
        }
        # a filter naming another site returns nothing (neither 403 nor its devices)
        r = client.get("/api/v1/devices", params={"site_id": b.name}, headers=h)
        assert r.json() == {"items": [], "next_cursor": None}
        r = client.get("/api/v1/devices", params={"site_id": a.name}, headers=h)
        assert ids(r, "device_id") == {a.device}

        alerts = ids(client.get("/api/v1/alerts", params={"limit": 500}, headers=h))
        assert a.alert in alerts
        assert b.alert not in alerts
        for params in ({"site_id": b.name}, {"device_id": b.device}):
            r = client.get("/api/v1/alerts", params=params, headers=h)
            assert r.json() == {"items": [], "next_cursor": None}
        notes = ids(client.get("/api/v1/notifications", params={"limit": 500}, headers=h))
        assert a.notification in notes
        assert b.notification not in notes
        for params in ({"site_id": b.name}, {"device_id": b.device}):
            r = client.get("/api/v1/notifications", params=params, headers=h)
            assert r.json() == {"items": [], "next_cursor": None}

        commands = ids(client.get("/api/v1/control/commands", params={"limit": 500}, headers=h))
        assert a.command in commands
        assert b.command not in commands
        r = client.get("/api/v1/control/commands", params={"device_id": b.device}, headers=h)
        assert r.json() == {"items": [], "next_cursor": None}

        rules = ids(client.get("/api/v1/alert-rules", headers=h))
        assert {a.rule, a.site_rule, world.global_rule} <= rules
        assert not {b.rule, b.site_rule} & rules

    # an admin, and a user of every site, see both sites
    for token in (tokens["admin"], tokens["viewer"]):
        h = auth(token)
        # filtered per site and device: other tests of the session fill the unfiltered pages
        for x in (a, b):
            site = {"site_id": x.name}
            devices = ids(client.get("/api/v1/devices", params=site, headers=h), "device_id")
            assert x.device in devices
            assert x.alert in ids(client.get("/api/v1/alerts", params=site, headers=h))
            notes = ids(client.get("/api/v1/notifications", params=site, headers=h))
            assert x.notification in notes
            mine = {"device_id": x.device}
            assert x.command in ids(client.get("/api/v1/control/commands", params=mine, headers=h))
        assert {a.rule, b.rule, b.site_rule} <= ids(client.get("/api/v1/alert-rules", headers=h))


def test_another_sites_resources_answer_404_like_unknown_ones(
    client: httpx.Client, tokens: dict[str, str], world: World
) -> None:
    a, b = world.a, world.b
    paths = {
        "device": "/api/v1/devices/{device}",
        "readings": "/api/v1/devices/{device}/readings",
        "command": "/api/v1/control/commands/{command}",
        "rule": "/api/v1/alert-rules/{rule}",
    }

    def path(what: str, site: Site) -> str:
        return paths[what].format(device=site.device, command=site.command, rule=site.rule)

    unknown = {
        "device": f"/api/v1/devices/{new_device()}",
        "readings": f"/api/v1/devices/{new_device()}/readings",
        "command": f"/api/v1/control/commands/{uuid.uuid4()}",
        "rule": f"/api/v1/alert-rules/{uuid.uuid4()}",
    }
    for token in (world.viewer, world.operator):
        for what in paths:
            refused = assert_problem(client.get(path(what, b), headers=auth(token)), 404)
            missing = assert_problem(client.get(unknown[what], headers=auth(token)), 404)
            assert refused["title"] == missing["title"], what  # nothing tells them apart
            assert client.get(path(what, a), headers=auth(token)).status_code == 200, what
    for what in paths:
        for site in (a, b):
            r = client.get(path(what, site), headers=auth(tokens["admin"]))
            assert r.status_code == 200, (what, r.text)
    r = client.get(path("readings", a), headers=auth(world.viewer))
    assert sum(p["count"] for p in r.json()["points"]) >= 2


# --- writes ----------------------------------------------------------------------------------


def test_acks_of_another_sites_alert_and_notification_change_nothing(
    client: httpx.Client, db: psycopg.Connection, world: World
) -> None:
    a, b = world.a, world.b
    alert_sql = "SELECT status, acknowledged_at, acknowledged_by FROM alerts WHERE id = %s"
    note_sql = "SELECT acked_at, acked_by FROM notifications WHERE id = %s"
    before = (
        db.execute(alert_sql, (b.alert,)).fetchone(),
        db.execute(note_sql, (b.notification,)).fetchone(),
    )
    assert before[0] is not None and before[0][1] is None
    assert before[1] == (None, None)

    op = auth(world.operator)
    assert_problem(client.post(f"/api/v1/alerts/{b.alert}/ack", headers=op), 404)
    assert_problem(client.post(f"/api/v1/notifications/{b.notification}/ack", headers=op), 404)
    assert outbox_rows(db, b.device) == 0  # nothing queued for B's device
    # the viewer of site A may not ack at all
    assert_problem(client.post(f"/api/v1/alerts/{a.alert}/ack", headers=auth(world.viewer)), 403)

    # A's acks go the same way (outbox, alerts topic, projection) and are applied
    r = client.post(f"/api/v1/alerts/{a.alert}/ack", headers=op)
    assert r.status_code in (200, 202), r.text
    r = client.post(f"/api/v1/notifications/{a.notification}/ack", headers=op)
    assert r.status_code in (200, 202), r.text
    wait_for(
        lambda: db.execute(alert_sql, (a.alert,)).fetchone()[2] == world.operator_name,  # type: ignore[index]
        15,
        "A's alert acknowledged",
    )
    wait_for(
        lambda: db.execute(note_sql, (a.notification,)).fetchone()[1] == world.operator_name,  # type: ignore[index]
        15,
        "A's notification acked",
    )
    after = (
        db.execute(alert_sql, (b.alert,)).fetchone(),
        db.execute(note_sql, (b.notification,)).fetchone(),
    )
    assert after == before


def test_a_command_for_another_sites_device_is_refused_and_not_recorded(
    client: httpx.Client, db: psycopg.Connection, world: World
) -> None:
    a, b = world.a, world.b
    op = auth(world.operator)
    body = {"device_id": b.device, "command": "charge", "params": {"power_kw": 5}}
    key = f"idem-{uuid.uuid4().hex}"

    def requests_of(user: str) -> list[tuple[Any, ...]]:
        return db.execute(
            "SELECT id, device_id FROM command_requests WHERE requested_by = %s", (user,)
        ).fetchall()

    refused = assert_problem(client.post("/api/v1/control/commands", headers=op, json=body), 404)
    unknown = assert_problem(
        client.post(
            "/api/v1/control/commands", headers=op, json={**body, "device_id": new_device()}
        ),
        404,
    )
    assert refused["title"] == unknown["title"]
    r = client.post("/api/v1/control/commands", headers={**op, "Idempotency-Key": key}, json=body)
    assert_problem(r, 404)
    assert requests_of(world.operator_name) == []
    assert outbox_rows(db, b.device) == 0  # the ledger and the outbox are one transaction

    # the same request for A's device goes through, and reaches the read model
    r = client.post(
        "/api/v1/control/commands",
        headers={**op, "Idempotency-Key": key},
        json={**body, "device_id": a.device},
    )
    assert r.status_code == 202, r.text
    command = r.json()["id"]
    assert [row[1] for row in requests_of(world.operator_name)] == [a.device]
    wait_for(
        lambda: (
            client.get(f"/api/v1/control/commands/{command}", headers=op).json()["status"]
            == "processing"
        ),
        15,
        "A's command taken by the controller",
    )
    rows = db.execute(
        "SELECT device_id FROM control_commands WHERE requested_by = %s", (world.operator_name,)
    ).fetchall()
    assert rows == [(a.device,)]


# --- live events -----------------------------------------------------------------------------


def test_the_stream_delivers_only_the_users_sites(
    platform: Components,
    client: httpx.Client,
    db: psycopg.Connection,
    tokens: dict[str, str],
    world: World,
) -> None:
    a, b = world.a, world.b
    url = f"{platform.api_url}/api/v1/stream"
    # fresh devices: their first reading is announced at once (device.latest is throttled)
    device_a, device_b = new_device(), new_device()
    register_device(db, device_a, a.name, "test")
    register_device(db, device_b, b.name, "test")
    admin = SSEClient(url, tokens["admin"])
    scoped = SSEClient(url, world.viewer)
    try:
        assert admin.status == scoped.status == 200
        # B's events first: the admin's stream shows they are in the stream ...
        send(platform, b.key, device_b, b.name)
        b_latest = wait_for(lambda: admin.of("device.latest", device_id=device_b), 15, "B latest")
        r = client.post(
            "/api/v1/control/commands",
            headers=auth(tokens["admin"]),
            json={"device_id": device_b, "command": "reboot"},
        )
        assert r.status_code == 202, r.text
        b_control = wait_for(  # control events carry no site: the registry tells
            lambda: admin.of("control.updated", device_id=device_b), 15, "B control.updated"
        )
        # ... then A's, which the scoped stream receives after passing over B's
        send(platform, a.key, device_a, a.name)
        a_latest = wait_for(lambda: scoped.of("device.latest", device_id=device_a), 15, "A latest")
        r = client.post(
            "/api/v1/control/commands",
            headers=auth(tokens["admin"]),
            json={"device_id": device_a, "command": "reboot"},
        )
        assert r.status_code == 202, r.text
        a_control = wait_for(
            lambda: scoped.of("control.updated", device_id=device_a), 15, "A control.updated"
        )

        def order(event_id: str) -> tuple[int, int]:
            ms, _, seq = event_id.partition("-")
            return int(ms), int(seq)

        assert order(b_latest[0].id) < order(a_latest[0].id)
        assert order(b_control[0].id) < order(a_control[0].id)
        others = {b.device, device_b}
        assert [e for e in scoped.events if e.data.get("device_id") in others] == []
        assert {e.data.get("device_id") for e in scoped.events} <= {a.device, device_a}
        assert not scoped.of("error")
        # the admin's stream had A's events too
        wait_for(lambda: admin.of("control.updated", device_id=device_a), 15, "A on admin stream")
    finally:
        admin.close()
        scoped.close()


# --- changes of users ------------------------------------------------------------------------


def test_changes_of_sites_role_and_deleted_users_apply_within_the_cache_time(
    platform: Components, client: httpx.Client, db: psycopg.Connection, world: World
) -> None:
    a, b = world.a, world.b
    name = make_user(db, "operator", [a.name])
    token = login(client, name)
    h = auth(token)

    def sees_b() -> bool:
        return client.get(f"/api/v1/devices/{b.device}", headers=h).status_code == 200

    live = SSEClient(f"{platform.api_url}/api/v1/stream", token)
    try:
        assert not sees_b()
        db.execute("UPDATE users SET sites = %s WHERE username = %s", ([a.name, b.name], name))
        changed = time.monotonic()
        wait_for(sees_b, SCOPE_WAIT_S, "site B added to the user's sites")
        assert time.monotonic() - changed <= USER_CACHE_S + 2
        # the open stream follows: B's events reach it now
        device_b = new_device()
        register_device(db, device_b, b.name, "test")
        send(platform, b.key, device_b, b.name)
        wait_for(lambda: live.of("device.latest", device_id=device_b), 15, "B's event")
        _demote_and_delete(client, db, name, h)
        # and ends once its user is gone
        wait_for(lambda: live.of("session.expired"), 2 * SCOPE_WAIT_S, "the stream's end")
        assert "no longer exists" in live.of("session.expired")[0].data["reason"]
    finally:
        live.close()
    r = httpx.get(f"{platform.api_url}/api/v1/stream", headers=h, timeout=10)
    assert_problem(r, 401)


def _demote_and_delete(
    client: httpx.Client, db: psycopg.Connection, name: str, h: dict[str, str]
) -> None:
    # a command for an unknown device: 404 for an operator, 403 (the role) for a viewer
    unknown = {"device_id": new_device(), "command": "reboot"}
    assert_problem(client.post("/api/v1/control/commands", headers=h, json=unknown), 404)
    db.execute("UPDATE users SET role = 'viewer' WHERE username = %s", (name,))
    wait_for(
        lambda: client.post("/api/v1/control/commands", headers=h, json=unknown).status_code == 403,
        SCOPE_WAIT_S,
        "the operator demoted to viewer",
    )
    db.execute("DELETE FROM users WHERE username = %s", (name,))
    wait_for(
        lambda: client.get("/api/v1/devices", headers=h).status_code == 401,
        SCOPE_WAIT_S,
        "the deleted user refused",
    )
    assert_problem(client.get("/api/v1/devices", headers=h), 401)


def test_while_postgres_is_away_a_user_not_cached_gets_503_then_works_again(
    stack: Settings, tmp_path: Path
) -> None:
    """The user is read from PostgreSQL: with it away a request whose user is not cached
    answers 503 (problem+json, Retry-After), never an error or a stale 200 past the cache."""
    pg = PrivatePostgres()
    parts = Components(stack, tmp_path)
    try:
        pg.up()
        migrate(stack.model_copy(update={"database_url": pg.url}))
        port = free_port()
        parts.start("api", API_PORT=str(port), DATABASE_URL=pg.url)
        with psycopg.connect(pg.url, autocommit=True) as db:
            name = make_user(db, "viewer", ["site-a"])
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=20) as api:
            h = auth(login(api, name))
            assert api.get("/api/v1/devices", headers=h).status_code == 200
            pg.stop()
            down = wait_for(
                lambda: (r := api.get("/api/v1/devices", headers=h)).status_code != 200 and r,
                USER_CACHE_S + 30,
                "the cached user to expire",
            )
            assert_problem(down, 503)
            assert int(down.headers["retry-after"]) >= 1
            pg.start()
            wait_for(
                lambda: api.get("/api/v1/devices", headers=h).status_code == 200,
                30,
                "the user read again",
            )
    finally:
        parts.stop_all()
        pg.remove()


# --- the device registry (admins) ------------------------------------------------------------


def test_registry_routes_register_move_and_refuse_non_admins(
    platform: Components,
    client: httpx.Client,
    db: psycopg.Connection,
    tokens: dict[str, str],
    world: World,
) -> None:
    a, b = world.a, world.b
    admin = auth(tokens["admin"])
    admin_name = platform.s.auth_admin_username
    device = new_device()
    route = "/api/v1/registry/devices"

    def registry() -> list[tuple[Any, ...]]:
        return db.execute(
            "SELECT device_id, site_id, registered_by FROM device_registry"
            " WHERE device_id = %s UNION ALL SELECT device_id, to_site, moved_by"
            " FROM device_moves WHERE device_id = %s",
            (device, device),
        ).fetchall()

    # non-admins are refused, and nothing is written
    for token in (tokens["operator"], tokens["viewer"], world.operator, world.viewer):
        h = auth(token)
        body = {"device_id": device, "site_id": a.name}
        assert_problem(client.post(route, headers=h, json=body), 403)
        assert_problem(client.get(route, headers=h), 403)
        assert_problem(client.get(f"{route}/{a.device}", headers=h), 403)
        move = {"site_id": b.name, "reason": "no"}
        assert_problem(client.post(f"{route}/{a.device}/move", headers=h, json=move), 403)
    assert registry() == []
    assert db.execute(
        "SELECT site_id FROM device_registry WHERE device_id = %s", (a.device,)
    ).fetchone() == (a.name,)

    r = client.post(route, headers=admin, json={"device_id": device, "site_id": a.name})
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["device_id"] == device
    assert created["site_id"] == a.name
    assert created["registered_by"] == admin_name
    again = client.post(route, headers=admin, json={"device_id": device, "site_id": a.name})
    assert again.status_code == 200, again.text
    assert again.json() == created
    conflict = client.post(route, headers=admin, json={"device_id": device, "site_id": b.name})
    assert a.name in assert_problem(conflict, 409)["detail"]
    assert registry() == [(device, a.name, admin_name)]

    for bad in (
        {"device_id": "has space", "site_id": a.name},
        {"device_id": device, "site_id": ""},
        {"device_id": device},
        {"device_id": device, "site_id": a.name, "extra": 1},
    ):
        r = client.post(route, headers=admin, json=bad)
        assert r.status_code in (400, 422), (bad, r.text)
        assert r.headers["content-type"].startswith(PROBLEM_JSON)

    listed = ids(client.get(route, params={"site_id": a.name}, headers=admin), "device_id")
    assert {a.device, device} <= listed
    assert b.device not in listed
    page = client.get(route, params={"site_id": a.name, "limit": 1}, headers=admin).json()
    assert len(page["items"]) == 1 and page["next_cursor"]
    everything: set[str] = set()  # every page: other tests of the session register devices
    params: dict[str, Any] = {"limit": 500}
    while True:
        r = client.get(route, params=params, headers=admin)
        everything |= ids(r, "device_id")
        if not r.json()["next_cursor"]:
            break
        params["cursor"] = r.json()["next_cursor"]
    assert {a.device, b.device, device} <= everything

    # the device reports for site A, so A's viewer sees it ... until an admin moves it
    send(platform, a.key, device, a.name)
    viewer = auth(world.viewer)
    wait_for(
        lambda: client.get(f"/api/v1/devices/{device}", headers=viewer).status_code == 200,
        30,
        "the new device for A's viewer",
    )
    detail = client.get(f"{route}/{device}", headers=admin)
    assert detail.status_code == 200, detail.text
    assert detail.json() == {**created, "moves": []}

    moved = client.post(
        f"{route}/{device}/move", headers=admin, json={"site_id": b.name, "reason": "rewired"}
    )
    assert moved.status_code == 200, moved.text
    move = moved.json()
    assert {k: move[k] for k in ("device_id", "from_site", "to_site", "moved_by", "reason")} == {
        "device_id": device,
        "from_site": a.name,
        "to_site": b.name,
        "moved_by": admin_name,
        "reason": "rewired",
    }
    assert registry() == [(device, b.name, admin_name), (device, b.name, admin_name)]
    row = db.execute(
        "SELECT from_site, to_site, moved_by, reason FROM device_moves WHERE device_id = %s",
        (device,),
    ).fetchall()
    assert row == [(a.name, b.name, admin_name, "rewired")]
    detail = client.get(f"{route}/{device}", headers=admin).json()
    assert detail["site_id"] == b.name
    assert detail["moves"] == [move]
    # the registry is the authority: A's viewer no longer sees the device
    assert_problem(client.get(f"/api/v1/devices/{device}", headers=viewer), 404)
    assert device not in ids(client.get("/api/v1/devices", headers=viewer), "device_id")

    again = client.post(
        f"{route}/{device}/move", headers=admin, json={"site_id": b.name, "reason": "twice"}
    )
    assert_problem(again, 409)
    ghost = new_device()
    assert_problem(
        client.post(
            f"{route}/{ghost}/move", headers=admin, json={"site_id": b.name, "reason": "x"}
        ),
        404,
    )
    assert_problem(client.get(f"{route}/{ghost}", headers=admin), 404)
    for bad in (
        {"site_id": a.name},
        {"site_id": a.name, "reason": ""},
        {"site_id": "a b", "reason": "x"},
    ):
        r = client.post(f"{route}/{device}/move", headers=admin, json=bad)
        assert r.status_code in (400, 422), (bad, r.text)
    assert (
        len(db.execute("SELECT 1 FROM device_moves WHERE device_id = %s", (device,)).fetchall())
        == 1
    )
