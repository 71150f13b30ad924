"""HTTP ingest through Kafka into PostgreSQL, and every refusal the gateway owes a client."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psutil
import psycopg
import pytest

from tests.conftest import Components, free_port, wait_for
from tests.support import new_device, reading, retrying_post, stored_count


def post(platform: Components, path: str, key: str | None, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{platform.gateway_url}{path}", headers=headers, timeout=10, **kw)


def test_single_reading_is_stored_exactly_once(
    platform: Components, db: psycopg.Connection, site: str, device_key: str
) -> None:
    device = new_device()
    r = post(platform, "/api/v1/telemetry", device_key, json=reading(device, site, seq=7))
    assert r.status_code == 202
    assert r.json() == {"accepted": 1}
    wait_for(lambda: stored_count(db, [device]) == (1, 1), what="reading in PostgreSQL")
    latest = db.execute(
        "SELECT site_id, soc_pct, seq FROM device_latest WHERE device_id = %s", (device,)
    ).fetchone()
    assert latest == (site, 50.0, 7)
    registered = db.execute(
        "SELECT site_id, device_type FROM devices WHERE device_id = %s", (device,)
    ).fetchone()
    assert registered == (site, "battery")


def test_batch_of_many_devices_is_stored_exactly_once(
    platform: Components, db: psycopg.Connection, site: str, device_key: str
) -> None:
    devices = [new_device() for _ in range(5)]
    batch = [reading(d, site, seq=i) for i in range(60) for d in devices]
    r = post(platform, "/api/v1/telemetry/batch", device_key, json={"readings": batch})
    assert r.status_code == 202
    assert r.json() == {"accepted": 300}
    wait_for(lambda: stored_count(db, devices) == (300, 300), what="batch in PostgreSQL")
    latest = db.execute(
        "SELECT count(*), min(seq), max(seq) FROM device_latest WHERE device_id = ANY(%s)",
        (devices,),
    ).fetchone()
    assert latest == (5, 59, 59)


def _refused_cases(site: str, device: str) -> list[tuple[str, str, dict, int, str]]:
    good = reading(device, site)
    future = reading(device, site, ts=(datetime.now(UTC) + timedelta(days=2)).isoformat())
    return [
        ("no key", "/api/v1/telemetry", {"json": good}, 401, "Missing device key"),
        ("bad key", "/api/v1/telemetry", {"json": good}, 401, "Invalid device key"),
        ("other site", "/api/v1/telemetry", {"json": reading(device, "elsewhere")}, 403, "Site"),
        ("malformed", "/api/v1/telemetry", {"content": b'{"device_id": '}, 400, "Malformed"),
        ("wrong type", "/api/v1/telemetry", {"json": {**good, "soc_pct": "full"}}, 422, "soc_pct"),
        ("out of range", "/api/v1/telemetry", {"json": {**good, "soc_pct": 140}}, 422, "soc_pct"),
        ("unknown type", "/api/v1/telemetry", {"json": {**good, "device_type": "x"}}, 422, "type"),
        ("missing field", "/api/v1/telemetry", {"json": {"device_id": device}}, 422, "site_id"),
        ("future ts", "/api/v1/telemetry", {"json": future}, 422, "future"),
        ("huge seq", "/api/v1/telemetry", {"json": {**good, "seq": 2**63}}, 422, "seq"),
        ("newline id", "/api/v1/telemetry", {"json": {**good, "device_id": "d\n"}}, 422, "device"),
        ("empty batch", "/api/v1/telemetry/batch", {"json": {"readings": []}}, 422, "readings"),
        (
            "batch too big",
            "/api/v1/telemetry/batch",
            {"json": {"readings": [good] * 1001}},
            422,
            "at most 1000",
        ),
        (
            "one bad in batch",
            "/api/v1/telemetry/batch",
            {"json": {"readings": [good, {**good, "voltage_v": -5}]}},
            422,
            "readings[1].voltage_v",
        ),
        ("body too large", "/api/v1/telemetry/batch", {"content": b" " * 2_000_000}, 413, ""),
    ]


def _key_for(case: str, device_key: str) -> str | None:
    """The key a refused case sends: none, a forged one, or the site's real key."""
    return None if case == "no key" else "mgk_forged" if case == "bad key" else device_key


def test_bad_input_is_refused_with_problem_details_and_nothing_is_stored(
    platform: Components, db: psycopg.Connection, site: str, device_key: str
) -> None:
    device = new_device()
    for name, path, kw, status, needle in _refused_cases(site, device):
        key = _key_for(name, device_key)
        r = post(platform, path, key, **kw)
        assert r.status_code == status, (name, r.text)
        if status != 413:
            assert r.headers["content-type"].startswith("application/problem+json"), name
            assert needle in r.text, (name, r.text)
        if status == 401:
            assert "Bearer" in r.headers["www-authenticate"]
    # A good reading sent afterwards is stored, while nothing refused before it was.
    marker = new_device()
    assert (
        post(platform, "/api/v1/telemetry", device_key, json=reading(marker, site)).status_code
        == 202
    )
    wait_for(lambda: stored_count(db, [marker]) == (1, 1), what="marker reading")
    assert stored_count(db, [device]) == (0, 0)


@pytest.mark.parametrize("path", ["/api/v1/telemetry", "/api/v1/telemetry/batch"])
def test_unknown_route_and_method_use_problem_details(platform: Components, path: str) -> None:
    r = httpx.get(f"{platform.gateway_url}{path}", timeout=5)
    assert r.status_code == 405
    assert r.headers["content-type"].startswith("application/problem+json")


def test_overload_is_shed_with_503_and_everything_accepted_is_stored(
    platform: Components, db: psycopg.Connection, site: str, device_key: str
) -> None:
    port = free_port()
    platform.start(
        "gateway", alias="small-gateway", GATEWAY_PORT=str(port), INGEST_MAX_INFLIGHT_READINGS="100"
    )
    devices = [new_device() for _ in range(40)]
    batches = {d: {"readings": [reading(d, site, seq=i) for i in range(50)]} for d in devices}
    url = f"http://127.0.0.1:{port}/api/v1/telemetry/batch"
    auth = {"Authorization": f"Bearer {device_key}"}

    async def send_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=10) as client:
            return await asyncio.gather(
                *(client.post(url, headers=auth, json=batches[d]) for d in devices)
            )

    async def retry_all(refused: list[str]) -> list[int]:
        async with httpx.AsyncClient(timeout=10) as client:
            return await asyncio.gather(
                *(retrying_post(client, url, device_key, batches[d], 60) for d in refused)
            )

    try:
        responses = asyncio.run(send_all())
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {202, 503}
        assert 202 in statuses and 503 in statuses, statuses
        shed = [r for r in responses if r.status_code == 503]
        assert all(r.headers["retry-after"].isdigit() for r in shed)
        assert all("overloaded" in r.json()["title"] for r in shed)
        assert all(r.json()["outcome"] == "not stored" for r in shed)
        accepted = [d for d, r in zip(devices, responses, strict=True) if r.status_code == 202]
        wait_for(lambda: stored_count(db, accepted) == (50 * len(accepted),) * 2, what="accepted")
        refused = [d for d, r in zip(devices, responses, strict=True) if r.status_code == 503]
        assert stored_count(db, refused) == (0, 0)
        # the same batches again, concurrently, each retried until 202: all stored once
        asyncio.run(retry_all(devices))
    finally:
        platform.stop("small-gateway")
    wait_for(lambda: stored_count(db, devices)[0] >= 50 * len(devices), what="every batch")
    assert stored_count(db, devices) == (50 * len(devices),) * 2


def test_fast_path_and_litestar_handlers_answer_alike(
    platform: Components, db: psycopg.Connection, site: str, device_key: str
) -> None:
    # The ingest routes are served by a fast path in front of Litestar; a trailing slash
    # takes the same request through Litestar's own handlers instead.
    device = new_device()
    for name, path, kw, status, _ in _refused_cases(site, device):
        key = _key_for(name, device_key)
        fast, slow = post(platform, path, key, **kw), post(platform, path + "/", key, **kw)
        assert fast.status_code == slow.status_code == status, name
        assert fast.json() == slow.json(), name
        assert fast.headers["content-type"] == slow.headers["content-type"], name
        assert fast.headers.get("www-authenticate") == slow.headers.get("www-authenticate")
    # Two Authorization headers: both paths go by the first.
    for keys, status in (([device_key, "mgk_forged"], 403), (["mgk_forged", device_key], 401)):
        headers = [("Authorization", f"Bearer {k}") for k in keys]
        body = reading(device, "elsewhere")  # 403 once the first key is the good one
        for path in ("/api/v1/telemetry", "/api/v1/telemetry/"):
            r = httpx.post(f"{platform.gateway_url}{path}", headers=headers, timeout=10, json=body)
            assert r.status_code == status, (keys, path, r.text)
    one, other = new_device(), new_device()
    r = post(platform, "/api/v1/telemetry/", device_key, json=reading(one, site))
    assert (r.status_code, r.json()) == (202, {"accepted": 1})
    batch = {"readings": [reading(other, site, seq=i) for i in range(3)]}
    r = post(platform, "/api/v1/telemetry/batch/", device_key, json=batch)
    assert (r.status_code, r.json()) == (202, {"accepted": 3})
    wait_for(lambda: stored_count(db, [one, other]) == (4, 4), what="readings via Litestar")
    assert stored_count(db, [device]) == (0, 0)


def test_streamed_body_over_the_limit_is_refused(platform: Components, device_key: str) -> None:
    def chunks() -> Any:  # no Content-Length: the limit is enforced while reading
        for _ in range(40):
            yield b" " * 65536

    r = post(platform, "/api/v1/telemetry/batch", device_key, content=chunks())
    assert r.status_code == 413
    assert r.headers["content-type"] == "application/problem+json"
    assert r.json()["title"] == "Request body too large"


def test_gateway_metrics_count_ingest_requests_by_status(
    platform: Components, site: str, device_key: str
) -> None:
    def counts() -> dict[str, float]:
        text = httpx.get(f"{platform.gateway_url}/metrics", timeout=5).text
        found = {}
        for line in text.splitlines():
            if line.startswith("microgrid_requests_total{") and 'path="/api/v1/telemetry"' in line:
                status = line.split('status_code="')[1].split('"')[0]
                found[status] = float(line.rsplit(" ", 1)[1])
        return found

    before = counts()
    for _ in range(3):
        r = post(platform, "/api/v1/telemetry", device_key, json=reading(new_device(), site))
        assert r.status_code == 202
    assert post(platform, "/api/v1/telemetry", None, json={}).status_code == 401
    after = counts()
    assert after["202"] - before.get("202", 0) == 3
    assert after["401"] - before.get("401", 0) == 1


def test_gateway_is_ready_when_broker_and_database_answer(platform: Components) -> None:
    r = httpx.get(f"{platform.gateway_url}/readyz", timeout=10)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ready", "checks": {"kafka": "ok", "postgres": "ok"}}


def test_requests_in_progress_of_a_killed_worker_do_not_stay_counted(
    platform: Components, device_key: str
) -> None:
    port = free_port()
    # a body that never finishes stays in progress (up to the body timeout) with a good key
    platform.start(
        "gateway", alias="crash-gateway", GATEWAY_PORT=str(port), INGEST_BODY_TIMEOUT_S="120"
    )
    url = f"http://127.0.0.1:{port}"

    def in_progress() -> float:
        text = httpx.get(f"{url}/metrics", timeout=5).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("microgrid_requests_in_progress{")
            and 'path="/api/v1/telemetry"' in line
        )

    def workers() -> set[int]:
        found = set()
        for child in psutil.Process(platform.procs["crash-gateway"].pid).children():
            try:
                if child.status() != psutil.STATUS_ZOMBIE and any(
                    "spawn_main" in part for part in child.cmdline()
                ):
                    found.add(child.pid)
            except psutil.Error:  # gone meanwhile
                continue
        return found

    try:
        wait_for(lambda: len(workers()) == 2, 30, what="two gateway workers")
        before = workers()
        assert len(before) == 2
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            # a request whose body never finishes: in progress until its worker dies
            sock.sendall(
                b"POST /api/v1/telemetry HTTP/1.1\r\nHost: gw\r\nContent-Length: 100\r\n"
                b"Authorization: Bearer %s\r\n"
                % device_key.encode()
                + b'Content-Type: application/json\r\n\r\n{"device_id"'
            )
            wait_for(lambda: in_progress() == 1, 10, what="one request in progress")
            for pid in before:
                os.kill(pid, signal.SIGKILL)
            wait_for(lambda: len(workers() - before) == 2, 30, what="two new workers")
            wait_for(lambda: platform.healthy(url), 30, what="the gateway serving again")
        assert in_progress() == 0
    finally:
        platform.stop("crash-gateway")
