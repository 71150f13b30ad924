"""The live stream's two Redis streams (alert, notification and command events retained by
time; device.latest apart, lossy), its ids, its filters and `last_event_id`, against the real
processes."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest
import redis
from redis.asyncio import Redis

from contracts import Events, Streams
from query_api.auth import HASHER
from query_api.stream import ORIGIN, dropped_after
from runtime.devices import register_device
from runtime.keys import create_key
from runtime.settings import Settings
from tests.conftest import Components, wait_for
from tests.sse import Event, SSEClient
from tests.support import new_device

SKIP = {"device.latest", "error", "session.expired"}  # events that have no position of their own


def arrived(live: SSEClient, event: str, **match: Any) -> Callable[[], list[Event]]:
    return lambda: live.of(event, **match)


def order(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture()
def r(platform: Components) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(platform.s.redis_url)
    yield client
    client.close()


@pytest.fixture()
def rules(platform: Components, tokens: dict[str, str]) -> Iterator[list[str]]:
    """Rules a test made, deleted after it (they would raise alerts in later tests)."""
    made: list[str] = []
    yield made
    for rule_id in made:
        httpx.delete(
            f"{platform.api_url}/api/v1/alert-rules/{rule_id}",
            headers=auth(tokens["admin"]),
            timeout=10,
        )


def low_battery_rule(
    platform: Components, tokens: dict[str, str], rules: list[str], scope: dict[str, str]
) -> str:
    body = {
        "name": f"live {uuid.uuid4().hex[:6]}",
        "severity": "major",
        "kind": "threshold",
        "metric": "soc_pct",
        "op": "lt",
        "threshold": 10,
        "scope": scope,
    }
    r = httpx.post(
        f"{platform.api_url}/api/v1/alert-rules",
        json=body,
        headers=auth(tokens["admin"]),
        timeout=10,
    )
    assert r.status_code == 201, r.text
    rules.append(str(r.json()["id"]))
    return str(r.json()["id"])


def send(platform: Components, key: str, device: str, site: str, soc_pct: float) -> None:
    body = {
        "device_id": device,
        "site_id": site,
        "device_type": "battery",
        "ts": datetime.now(UTC).isoformat(),
        "soc_pct": soc_pct,
    }
    r = httpx.post(
        f"{platform.gateway_url}/api/v1/telemetry", json=body, headers=auth(key), timeout=10
    )
    assert r.status_code == 202, r.text


def raise_alert(
    platform: Components, db: psycopg.Connection, key: str, device: str, site: str, rule_id: str
) -> str:
    """Low-battery readings until the rule (which the alerter may not have yet) opens an alert
    on the device: its id."""

    def opened() -> Any:
        send(platform, key, device, site, soc_pct=5)
        return db.execute(
            "SELECT id FROM alerts WHERE rule_id = %s AND device_id = %s", (rule_id, device)
        ).fetchone()

    row = wait_for(opened, 30, f"an alert on {device}")
    return str(row[0])


def end_of(r: redis.Redis, key: str) -> str:
    """Where a stream stands now (what a client connecting now starts after)."""
    last: Any = r.xrevrange(key, count=1)
    return last[0][0].decode() if last else "0-0"


def entries(r: redis.Redis, key: str, after: str = "0-0") -> list[Any]:
    """The stream's entries after this id, (id, fields) in bytes."""
    found: Any = r.xrange(key, min=f"({after}" if after != "0-0" else "-")
    return list(found)


def positions_hold(events: list[Event], connected_at: str, filtered: bool = False) -> None:
    """Every event has an id; a device.latest event's id is that of the last alert,
    notification or command event the client was passed (or its position at connecting). On
    a filtered stream it may be later: the position moves over what the filters leave out."""
    position = None
    for e in events:
        assert e.id, e
        if e.event not in SKIP:
            assert position is None or order(e.id) > order(position), (e, position)
            position = e.id
        elif e.event == Events.DEVICE_LATEST:
            if position is None:  # the stream's end when it connected
                assert order(e.id) >= order(connected_at), (e, connected_at)
                position = e.id
            if filtered:
                assert order(e.id) >= order(position), (e, position)
                position = e.id
            else:
                assert e.id == position, (e, position)


def test_an_alert_survives_a_flood_of_latest_values_and_is_resumed(
    platform: Components,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
    rules: list[str],
    r: redis.Redis,
) -> None:
    s = platform.s
    events_key, latest_key = s.topic(Streams.EVENTS), s.topic(Streams.LATEST)
    device = new_device()
    rule_id = low_battery_rule(platform, tokens, rules, {"device_id": device})
    before = end_of(r, events_key)
    alert_id = raise_alert(platform, db, device_key, device, site, rule_id)

    def published() -> list[tuple[bytes, dict[bytes, bytes]]]:
        return [
            (entry_id, fields)
            for entry_id, fields in entries(r, events_key, before)
            if fields[b"event"] == Events.ALERT_OPENED.encode()
            and json.loads(fields[b"data"])["id"] == alert_id
        ]

    [(alert_entry, _)] = wait_for(published, 15, "the alert in the events stream")
    # its readings' device.latest went to the latest stream, and none to the events stream
    wait_for(
        lambda: any(
            json.loads(fields[b"data"])["device_id"] == device
            for _, fields in entries(r, latest_key, before)
        ),
        15,
        "the device's latest values in the latest stream",
    )
    assert not [
        entry_id
        for entry_id, fields in entries(r, events_key)
        if fields[b"event"] == Events.DEVICE_LATEST.encode()
    ]
    # far more latest values than the latest stream keeps (the shared stream of old did the
    # same to the alert within a fraction of a second at 100,000 devices)
    flood = 12_000
    payload = {"device_id": "flood", "ts": datetime.now(UTC).isoformat(), "soc_pct": 50.0}
    for start in range(0, flood, 1000):
        with r.pipeline(transaction=False) as pipe:
            for i in range(start, start + 1000):
                data = json.dumps({**payload, "device_id": f"flood-{i}"})
                pipe.xadd(
                    latest_key,
                    {"event": Events.DEVICE_LATEST, "data": data},
                    maxlen=s.latest_stream_maxlen,
                    approximate=True,
                )
            pipe.execute()
    assert r.xlen(latest_key) < flood  # trimmed by count
    assert published(), "the flood trimmed the alert"

    resumed = SSEClient(f"{platform.api_url}/api/v1/stream", tokens["admin"], before)
    try:
        assert resumed.status == 200
        [opened] = wait_for(
            lambda: resumed.of(Events.ALERT_OPENED, id=alert_id), 15, "the alert, resumed"
        )
        assert opened.id == alert_entry.decode()
        assert not resumed.of("error")
        # the latest feed is not resumed: it starts at the latest stream's end
        assert not [e for e in resumed.of(Events.DEVICE_LATEST) if e.data["device_id"] == device]
        assert not [e for e in resumed.events if str(e.data).find("flood-") >= 0]
    finally:
        resumed.close()


def make_user(db: psycopg.Connection, role: str, sites: list[str]) -> str:
    username = f"qa-{role}-{uuid.uuid4().hex[:10]}"
    db.execute(
        "INSERT INTO users (username, role, password_hash, sites) VALUES (%s, %s, %s, %s)",
        (username, role, HASHER.hash(username), sites),
    )
    return username


def login(platform: Components, username: str) -> str:
    r = httpx.post(
        f"{platform.api_url}/api/v1/auth/login",
        json={"username": username, "password": username},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


def test_filters_by_site_device_and_event(
    platform: Components,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
    rules: list[str],
    r: redis.Redis,
) -> None:
    a, a_key = site, device_key
    b = f"site-{uuid.uuid4().hex[:8]}"
    b_key = create_key(db, b)
    a1, a2, b1 = new_device(), new_device(), new_device()
    for device, owner in ((a1, a), (a2, a), (b1, b)):
        register_device(db, device, owner, "test")
    rule_a = low_battery_rule(platform, tokens, rules, {"site_id": a})
    rule_b = low_battery_rule(platform, tokens, rules, {"site_id": b})
    scoped = login(platform, make_user(db, "viewer", [a]))
    url = f"{platform.api_url}/api/v1/stream"
    admin = tokens["admin"]
    connected_at = end_of(r, platform.s.topic(Streams.EVENTS))
    everything = SSEClient(url, admin)
    streams = {
        "site": SSEClient(f"{url}?site_id={a}", admin),
        "sites, one outside the user's": SSEClient(f"{url}?site_id={b},{a}", scoped),
        "device": SSEClient(f"{url}?device_id={a1}&device_id=other-device", admin),
        "event": SSEClient(f"{url}?event={Events.ALERT_OPENED}", admin),
    }
    try:
        assert everything.status == 200
        assert {live.status for live in streams.values()} == {200}
        # B's events first: the unfiltered stream shows they are in the streams ...
        b_alert = raise_alert(platform, db, b_key, b1, b, rule_b)
        wait_for(lambda: everything.of(Events.NOTIFICATION_CREATED, alert_id=b_alert), 15, "B")
        wait_for(lambda: everything.of(Events.DEVICE_LATEST, device_id=b1), 15, "B's latest")
        send(platform, a_key, a2, a, soc_pct=50)
        wait_for(lambda: everything.of(Events.DEVICE_LATEST, device_id=a2), 15, "a2's latest")
        # ... then A's: a stream that has A's alert passed over everything before it
        a_alert = raise_alert(platform, db, a_key, a1, a, rule_a)
        for name, live in streams.items():
            wait_for(arrived(live, Events.ALERT_OPENED, id=a_alert), 15, f"{name}: A's alert")
        wait_for(lambda: everything.of(Events.NOTIFICATION_CREATED, alert_id=a_alert), 15, "A")
        for name in ("site", "sites, one outside the user's", "device"):
            wait_for(
                arrived(streams[name], Events.NOTIFICATION_CREATED, alert_id=a_alert),
                15,
                f"{name}: A's notification",
            )
            wait_for(
                arrived(streams[name], Events.DEVICE_LATEST, device_id=a1),
                15,
                f"{name}: a1's latest",
            )

        def devices(live: SSEClient) -> set[str]:
            return {e.data["device_id"] for e in live.events if isinstance(e.data, dict)}

        assert not everything.of("error")
        positions_hold(everything.events, connected_at)
        for live in streams.values():
            assert not live.of("error")
            positions_hold(live.events, connected_at, filtered=True)
        assert {a1, a2, b1} <= devices(everything)
        assert devices(streams["site"]) == {a1, a2}
        assert devices(streams["sites, one outside the user's"]) == {a1, a2}
        assert devices(streams["device"]) == {a1}
        assert {e.event for e in streams["event"].events} == {Events.ALERT_OPENED}
        assert {e.data["id"] for e in streams["event"].events} >= {a_alert, b_alert}
        # what a filter left out moved the position on: a1's latest values name a position
        # after B's events
        [b_note] = everything.of(Events.NOTIFICATION_CREATED, alert_id=b_alert)
        for e in streams["device"].of(Events.DEVICE_LATEST, device_id=a1):
            assert order(e.id) >= order(b_note.id)
    finally:
        for live in (everything, *streams.values()):
            live.close()

    # an unknown event name: 400, naming the events there are
    bad = httpx.get(
        url,
        params={"access_token": admin, "event": f"{Events.ALERT_OPENED},alert.exploded"},
        timeout=10,
    )
    assert bad.status_code == 400, bad.text
    assert bad.headers["content-type"].startswith("application/problem+json")
    assert "alert.exploded" in bad.json()["detail"]
    assert Events.DEVICE_LATEST in bad.json()["events"]
    malformed = httpx.get(url, params={"access_token": admin, "site_id": "a,,b"}, timeout=10)
    assert malformed.status_code == 400, malformed.text
    assert malformed.headers["content-type"].startswith("application/problem+json")


def test_last_event_id_parameter_resumes_like_the_header(
    platform: Components,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
    rules: list[str],
) -> None:
    url = f"{platform.api_url}/api/v1/stream"
    admin = tokens["admin"]
    d1, d2 = new_device(), new_device()
    rule_id = low_battery_rule(platform, tokens, rules, {"site_id": site})
    first = SSEClient(url, admin)
    try:
        one = raise_alert(platform, db, device_key, d1, site, rule_id)
        [seen] = wait_for(lambda: first.of(Events.ALERT_OPENED, id=one), 15, "the first alert")
    finally:
        first.close()
    two = raise_alert(platform, db, device_key, d2, site, rule_id)
    clients = {
        "query": SSEClient(f"{url}?last_event_id={seen.id}", admin),
        # the header wins: 0-0 would replay the first alert
        "header and query": SSEClient(f"{url}?last_event_id=0-0", admin, seen.id),
    }
    try:
        for name, resumed in clients.items():
            wait_for(arrived(resumed, Events.ALERT_OPENED, id=two), 15, f"{name}: resumed")
            assert not resumed.of(Events.ALERT_OPENED, id=one), name
            assert not resumed.of("error"), name
    finally:
        for resumed in clients.values():
            resumed.close()
    # a value that is not an event id is ignored, and the stream says so
    ignored = SSEClient(f"{url}?last_event_id=yesterday", admin)
    try:
        [notice] = wait_for(lambda: ignored.of("error"), 15, "the notice")
        assert "last_event_id is not an event id" in notice.data["reason"]
    finally:
        ignored.close()


def test_a_latest_value_names_the_last_reliable_position(
    platform: Components,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
    rules: list[str],
    r: redis.Redis,
) -> None:
    device, other = new_device(), new_device()
    rule_id = low_battery_rule(platform, tokens, rules, {"device_id": device})
    connected_at = end_of(r, platform.s.topic(Streams.EVENTS))
    live = SSEClient(f"{platform.api_url}/api/v1/stream", tokens["admin"])
    try:
        send(platform, device_key, other, site, soc_pct=50)  # before any alert
        wait_for(lambda: live.of(Events.DEVICE_LATEST, device_id=other), 15, "a latest value")
        alert_id = raise_alert(platform, db, device_key, device, site, rule_id)
        [note] = wait_for(
            lambda: live.of(Events.NOTIFICATION_CREATED, alert_id=alert_id), 15, "notification"
        )
        fresh = new_device()  # its first reading is announced at once
        send(platform, device_key, fresh, site, soc_pct=50)
        [latest] = wait_for(lambda: live.of(Events.DEVICE_LATEST, device_id=fresh), 15, "latest")
        assert order(latest.id) >= order(note.id)
        positions_hold(live.events, connected_at)
    finally:
        live.close()


def test_a_resume_is_told_of_trimmed_events_only_when_some_may_be_gone(stack: Settings) -> None:
    """The dropped-events check against a real stream trimmed by time (MINID, exact here), with
    entry ids set in the past: a position still kept, or one younger than the retention before
    the newest event, lost nothing; one older than that and no longer kept may have; so may any
    position of a stream that is gone or was made again (Redis lost its data)."""
    retention_ms = 900_000
    key = f"{stack.topic('live-stream-test')}:{uuid.uuid4().hex}"

    async def scenario() -> dict[str, bool]:
        client = Redis.from_url(stack.redis_url)
        try:
            now = int(time.time() * 1000)
            old = [f"{now - 20 * 60_000 + i}-0" for i in range(5)]  # 20 min ago

            async def dropped(cursor: str) -> bool:
                return await dropped_after(client, key, cursor, retention_ms)

            seen = {"no stream, from the start": await dropped(ORIGIN)}
            seen["no stream, from a position"] = await dropped(old[0])
            for entry_id in old:
                await client.xadd(key, {"event": "alert.opened", "data": "{}"}, id=entry_id)
            seen["kept"] = await dropped(old[1])
            recent = f"{now - 60_000}-0"
            await client.xadd(key, {"event": "alert.opened", "data": "{}"}, id=recent)
            newest: Any = await client.xadd(
                key,
                {"event": "alert.opened", "data": "{}"},
                minid=now - retention_ms,
                approximate=False,
            )
            assert await client.xlen(key) == 2  # the five old ones trimmed
            seen["trimmed, older than the retention"] = await dropped(old[1])
            seen["trimmed, the last of them"] = await dropped(old[-1])
            seen["not kept, younger than the retention"] = await dropped(f"{now - 120_000}-0")
            seen["the newest"] = await dropped(newest.decode())
            seen["from the start, after a trim"] = await dropped(ORIGIN)
            await client.delete(key)
            await client.xadd(key, {"event": "alert.opened", "data": "{}"})
            seen["a stream made again"] = await dropped(recent)
            return seen
        finally:
            await client.delete(key)
            await client.aclose()

    assert asyncio.run(scenario()) == {
        "no stream, from the start": False,
        "no stream, from a position": True,
        "kept": False,
        "trimmed, older than the retention": True,
        # Redis does not say what a trim removed: counted as dropped, to be safe
        "trimmed, the last of them": True,
        "not kept, younger than the retention": False,
        "the newest": False,
        "from the start, after a trim": True,
        "a stream made again": True,
    }


def test_a_reading_within_the_latest_interval_arrives_once_the_interval_passed(
    platform: Components, tokens: dict[str, str], site: str, device_key: str
) -> None:
    """device.latest is throttled per device (DEVICE_LATEST_INTERVAL_S), never stale: the last
    of readings sent in quick succession is announced when the interval has passed."""
    device = new_device()
    live = SSEClient(f"{platform.api_url}/api/v1/stream?device_id={device}", tokens["viewer"])
    try:
        send(platform, device_key, device, site, soc_pct=50)
        wait_for(lambda: live.of(Events.DEVICE_LATEST, soc_pct=50), 15, "the first reading")
        for soc in (51, 52, 53):  # well within the 2 s interval of the first
            send(platform, device_key, device, site, soc_pct=soc)
        wait_for(lambda: live.of(Events.DEVICE_LATEST, soc_pct=53), 15, "the last reading")
        values = [e.data["soc_pct"] for e in live.of(Events.DEVICE_LATEST)]
        assert values[0] == 50 and values[-1] == 53, values
        assert len(values) <= 3, values  # held and coalesced, not one event per reading
    finally:
        live.close()
