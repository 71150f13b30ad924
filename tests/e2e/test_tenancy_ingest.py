"""Sites own their devices: a key, or a direct-Kafka record, of one site can neither write
another site's device nor take or answer its commands; admins register and move devices."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest

from contracts import Headers
from runtime.keys import create_key
from runtime.settings import Settings
from tests.conftest import Components, free_port, wait_for
from tests.e2e.test_control import answer, command, fetch_next
from tests.e2e.test_ingest_kafka import dead_letters, produce
from tests.support import microgrid_cli, new_device, reading, stored_count


def devices_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return microgrid_cli("devices", *args)


def post(url: str, key: str, body: dict[str, Any], batch: bool = False) -> httpx.Response:
    return httpx.post(
        f"{url}/api/v1/telemetry{'/batch' if batch else ''}",
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )


def new_site() -> str:
    return f"site-{uuid.uuid4().hex[:8]}"


def owner(db: psycopg.Connection, device: str) -> str | None:
    row = db.execute(
        "SELECT site_id FROM device_registry WHERE device_id = %s", (device,)
    ).fetchone()
    return row[0] if row else None


def test_key_of_one_site_cannot_touch_a_device_of_another(
    platform: Components, tokens: dict[str, str], db: psycopg.Connection
) -> None:
    site_a, site_b = new_site(), new_site()
    key_a, key_b = create_key(db, site_a), create_key(db, site_b)
    device_a, device_b = new_device(), new_device()
    url = platform.gateway_url
    # Each device's first reading registers it to its key's site (the default policy).
    assert post(url, key_b, reading(device_b, site_b, seq=0)).status_code == 202
    wait_for(lambda: stored_count(db, [device_b]) == (1, 1), what="site B's first reading")
    assert owner(db, device_b) == site_b

    # Reading: the device is B's, the key A's.
    r = post(url, key_a, reading(device_b, site_a, seq=1))
    assert r.status_code == 403, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["title"] == "Device of another site"
    assert site_b not in r.text  # the owner is not revealed
    # Reading claiming site B under A's key: refused as before, for the site.
    assert post(url, key_a, reading(device_b, site_b, seq=2)).status_code == 403
    # Batch: one foreign device refuses the whole request, A's own reading included.
    batch = {"readings": [reading(device_a, site_a, seq=3), reading(device_b, site_a, seq=4)]}
    r = post(url, key_a, batch, batch=True)
    assert r.status_code == 403, r.text
    assert device_b in r.json()["detail"]

    # Commands: A's key can neither take B's command nor answer it.
    cid = command(platform, tokens["operator"], device_b)
    wait_for(
        lambda: db.execute(
            "SELECT 1 FROM control_commands WHERE id = %s AND status = 'processing'", (cid,)
        ).fetchone(),
        15,
        "command dispatched",
    )
    assert fetch_next(platform, key_a, device_b, wait=0).status_code == 403
    assert answer(platform, key_a, cid, "succeeded").status_code == 403
    taken = fetch_next(platform, key_b, device_b, wait=5)  # so it was not handed out to A
    assert taken.status_code == 200 and taken.json()["id"] == cid
    assert answer(platform, key_b, cid, "failed", "refused by the test").status_code == 202

    # Marker: B's next reading and A's own device are stored; nothing refused is.
    assert post(url, key_b, reading(device_b, site_b, seq=5)).status_code == 202
    assert post(url, key_a, reading(device_a, site_a, seq=6)).status_code == 202
    wait_for(lambda: stored_count(db, [device_b, device_a]) == (3, 3), what="the marker readings")
    seqs = db.execute(
        "SELECT device_id, seq FROM telemetry_readings WHERE device_id = ANY(%s) ORDER BY seq",
        ([device_a, device_b],),
    ).fetchall()
    assert seqs == [(device_b, 0), (device_b, 5), (device_a, 6)]
    row = db.execute("SELECT site_id FROM devices WHERE device_id = %s", (device_b,)).fetchone()
    assert row == (site_b,)  # the read model still says B
    wait_for(
        lambda: (
            db.execute("SELECT status FROM control_commands WHERE id = %s", (cid,)).fetchone()
            == ("failed",)
        ),
        15,
        "B's own answer recorded",
    )


def test_kafka_record_for_another_sites_device_is_dead_lettered(
    platform: Components, db: psycopg.Connection, stack: Settings
) -> None:
    site_a, site_b = new_site(), new_site()
    key_b = create_key(db, site_b)
    device = new_device()
    assert post(platform.gateway_url, key_b, reading(device, site_b, seq=0)).status_code == 202
    wait_for(lambda: owner(db, device) == site_b, what="device registered to B")
    foreign = json.dumps(reading(device, site_a, seq=1)).encode()
    marker = json.dumps(reading(device, site_b, seq=2)).encode()
    asyncio.run(produce(stack, [(device.encode(), foreign), (device.encode(), marker)]))
    wait_for(lambda: stored_count(db, [device]) == (2, 2), what="B's record after A's")
    assert db.execute(
        "SELECT seq FROM telemetry_readings WHERE device_id = %s ORDER BY seq", (device,)
    ).fetchall() == [(0,), (2,)]
    letters = asyncio.run(dead_letters(stack, device.encode(), want=1))
    assert [r.value for r in letters] == [foreign]
    reason = dict(letters[0].headers)[Headers.DLQ_REASON].decode()
    assert "belongs to another site" in reason


def test_a_direct_kafka_device_is_registered_by_its_first_record(
    platform: Components, db: psycopg.Connection, stack: Settings
) -> None:
    site = new_site()
    device = new_device()
    asyncio.run(produce(stack, [(device.encode(), json.dumps(reading(device, site)).encode())]))
    wait_for(lambda: stored_count(db, [device]) == (1, 1), what="direct record stored")
    row = db.execute(
        "SELECT site_id, registered_by FROM device_registry WHERE device_id = %s", (device,)
    ).fetchone()
    assert row == (site, "first reading, on Kafka")


def test_admin_registers_and_moves_devices_with_a_record(
    platform: Components, db: psycopg.Connection
) -> None:
    site_a, site_b = new_site(), new_site()
    key_a, key_b = create_key(db, site_a), create_key(db, site_b)
    device = new_device()
    url = platform.gateway_url

    done = devices_cli("add", device, "--site", site_a)
    assert done.returncode == 0, done.stderr
    assert f"registered {device} to site {site_a}" in done.stdout
    again = devices_cli("add", device, "--site", site_a)
    assert again.returncode == 0 and "already belongs" in again.stdout
    taken = devices_cli("add", device, "--site", site_b)
    assert taken.returncode == 1
    assert f"belongs to site {site_a!r}" in taken.stderr
    bad = devices_cli("add", "bad device", "--site", site_a)
    assert bad.returncode == 1 and "invalid device id" in bad.stderr

    assert post(url, key_a, reading(device, site_a, seq=0)).status_code == 202
    assert post(url, key_b, reading(device, site_b, seq=1)).status_code == 403

    nowhere = devices_cli("move", new_device(), "--to", site_b, "--reason", "x")
    assert nowhere.returncode == 1 and "is not registered" in nowhere.stderr
    moved = devices_cli("move", device, "--to", site_b, "--reason", "sold to site B")
    assert moved.returncode == 0, moved.stderr
    # Every gateway worker forgets the old owner when the move commits (NOTIFY).
    wait_for(
        lambda: post(url, key_b, reading(device, site_b, seq=2)).status_code == 202,
        10,
        "B's key accepted after the move",
    )
    for _ in range(4):  # whichever worker answers
        assert post(url, key_a, reading(device, site_a, seq=3)).status_code == 403

    shown = devices_cli("show", device, "--json")
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["site_id"] == site_b
    assert doc["registered_by"].startswith("cli")
    [move] = doc["moves"]
    assert (move["from_site"], move["to_site"], move["reason"]) == (
        site_a,
        site_b,
        "sold to site B",
    )
    assert move["moved_by"].startswith("cli")
    listed = devices_cli("list", "--site", site_b, "--json")
    assert [d["device_id"] for d in json.loads(listed.stdout)] == [device]
    wait_for(lambda: stored_count(db, [device]) == (2, 2), what="A's and then B's reading")


@pytest.fixture(scope="module")
def admin_gateway(platform: Components) -> Iterator[str]:
    """A gateway that accepts only devices an admin registered."""
    port = free_port()
    platform.start(
        "gateway",
        alias="admin-policy-gateway",
        GATEWAY_PORT=str(port),
        GATEWAY_WORKERS="1",
        DEVICE_REGISTRATION="admin",
    )
    yield f"http://127.0.0.1:{port}"
    platform.stop("admin-policy-gateway")


def test_admin_policy_accepts_only_registered_devices(
    admin_gateway: str, db: psycopg.Connection
) -> None:
    site = new_site()
    key = create_key(db, site)
    device = new_device()
    r = post(admin_gateway, key, reading(device, site, seq=0))
    assert r.status_code == 403, r.text
    assert r.json()["title"] == "Device not registered"
    assert owner(db, device) is None  # the refused reading registered nothing
    assert devices_cli("add", device, "--site", site).returncode == 0
    assert post(admin_gateway, key, reading(device, site, seq=1)).status_code == 202
    wait_for(lambda: stored_count(db, [device]) == (1, 1), what="the registered device's reading")
