"""Device keys: the CLI verbs (list, revoke, rotate), revocation within the gateway's cache
time, and the key checked before the body is read, whose read is bounded in time."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator

import httpx
import psycopg
import pytest

from runtime.keys import create_key, revoke_key
from runtime.settings import Settings
from tests.conftest import Components, free_port, wait_for
from tests.support import microgrid_cli, new_device, reading

CACHE_S = 2.0
BODY_TIMEOUT_S = 1.5


def keys_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return microgrid_cli("keys", *args)


@pytest.fixture(scope="module")
def gateway(platform: Components) -> Iterator[str]:
    """A gateway of its own with a short key cache and body timeout."""
    port = free_port()
    platform.start(
        "gateway",
        alias="keys-gateway",
        GATEWAY_PORT=str(port),
        GATEWAY_WORKERS="1",  # one process: each request sees the same cache
        INGEST_KEY_CACHE_S=str(CACHE_S),
        INGEST_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
    )
    yield f"http://127.0.0.1:{port}"
    platform.stop("keys-gateway")


def send(url: str, key: str, site: str) -> int:
    r = httpx.post(
        f"{url}/api/v1/telemetry",
        headers={"Authorization": f"Bearer {key}"},
        json=reading(new_device(), site),
        timeout=10,
    )
    assert r.status_code in (202, 401), r.text
    return r.status_code


def refused(url: str, key: str, site: str) -> bool:
    return send(url, key, site) == 401


def test_keys_list_revoke_and_rotate(stack: Settings, db: psycopg.Connection, site: str) -> None:
    first = keys_cli("create", "--site", site).stdout.strip()
    second = create_key(db, site)
    listed = keys_cli("list", "--site", site, "--json")
    assert listed.returncode == 0, listed.stderr
    keys = json.loads(listed.stdout)
    assert [k["prefix"] for k in keys] == [first[:12], second[:12]]
    assert all(k["active"] and k["revoked_at"] is None and k["site"] == site for k in keys)
    assert first not in listed.stdout and second not in listed.stdout
    table = keys_cli("list", "--site", site).stdout
    assert table.splitlines()[0].split() == ["ID", "PREFIX", "SITE", "CREATED", "REVOKED", "STATUS"]
    assert first[:12] in table and first not in table

    unknown = keys_cli("revoke", "mgk_nosuchkey")
    assert unknown.returncode == 1 and "no key matches" in unknown.stderr
    ambiguous = keys_cli("revoke", "mgk_")
    assert ambiguous.returncode == 1 and "give the id" in ambiguous.stderr

    revoked = keys_cli("revoke", first[:12])
    assert revoked.returncode == 0, revoked.stderr
    again = keys_cli("revoke", str(keys[0]["id"]))
    assert again.returncode == 1 and "was revoked" in again.stderr

    rotated = keys_cli("rotate", second, "--grace", "1h")
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.strip()
    assert new.startswith("mgk_") and "\n" not in new
    after = {k["prefix"]: k for k in json.loads(keys_cli("list", "--site", site, "--json").stdout)}
    assert not after[first[:12]]["active"]
    assert after[second[:12]]["active"] and after[second[:12]]["revoked_at"]  # in grace
    assert after[new[:12]]["active"] and after[new[:12]]["revoked_at"] is None
    in_grace = db.execute(
        "SELECT revoked_at - now() FROM device_keys WHERE id = %s", (after[second[:12]]["id"],)
    ).fetchone()
    assert in_grace and 3500 < in_grace[0].total_seconds() <= 3600
    assert keys_cli("rotate", first[:12]).returncode == 1  # a revoked key is not rotated


def test_a_revoked_key_is_refused_within_the_cache_time(
    gateway: str, db: psycopg.Connection, site: str
) -> None:
    key = create_key(db, site)
    assert send(gateway, key, site) == 202  # now in the cache
    revoke_key(db, key)  # what `keys revoke` does (the CLI's start-up alone can take seconds)
    revoked = time.monotonic()
    wait_for(lambda: refused(gateway, key, site), CACHE_S + 3, "401")
    print(f"\nrevoked key refused after {time.monotonic() - revoked:.2f} s (cache {CACHE_S} s)")


def test_a_rotated_key_works_until_its_grace_ends(
    gateway: str, db: psycopg.Connection, site: str
) -> None:
    old = create_key(db, site)
    assert send(gateway, old, site) == 202
    rotated = keys_cli("rotate", old, "--grace", "4s")
    assert rotated.returncode == 0, rotated.stderr
    began = time.monotonic()
    new = rotated.stdout.strip()
    assert send(gateway, new, site) == 202
    assert send(gateway, old, site) == 202  # in its grace period
    wait_for(lambda: refused(gateway, old, site), 4 + CACHE_S + 3, "401")
    assert time.monotonic() - began > 3  # not before the grace ended (a second's margin)
    assert send(gateway, new, site) == 202


def _raw_request(port: int, path: str, key: str, partial_body: bytes) -> socket.socket:
    """A request announcing 1,000 bytes of body and sending only `partial_body`."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        b"POST %s HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer %s\r\nContent-Length: 1000\r\n\r\n%s"
        % (path.encode(), key.encode(), partial_body)
    )
    return sock


def _response(sock: socket.socket) -> tuple[int, bytes, bytes]:
    """Status, head and body of the answer."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(head.split(b" ", 2)[1]), head.lower(), body


# the fast path, and (trailing slash) Litestar's own handlers
@pytest.mark.parametrize("path", ["/api/v1/telemetry", "/api/v1/telemetry/"])
def test_a_bad_key_is_refused_before_the_body_and_a_slow_body_times_out(
    gateway: str, device_key: str, path: str
) -> None:
    port = int(gateway.rsplit(":", 1)[1])
    for key, status, bound in (("mgk_forged", 401, 1.0), (device_key, 408, BODY_TIMEOUT_S + 1.5)):
        started = time.monotonic()
        sock = _raw_request(port, path, key, b'{"device_id"')  # the rest never comes
        with sock:
            got, head, body = _response(sock)
        took = time.monotonic() - started
        assert got == status, (head, body)
        assert b"content-type: application/problem+json" in head
        assert took < bound, f"{status} took {took:.2f} s"
        if status == 408:
            assert took >= BODY_TIMEOUT_S - 0.1
            assert b"connection: close" in head
            assert b"INGEST_BODY_TIMEOUT_S" in body and b"not stored" in body


def users_cli(*args: str, stdin: str) -> subprocess.CompletedProcess[str]:
    return microgrid_cli("users", *args, stdin=stdin)


def test_a_user_set_by_the_cli_logs_in_with_its_role(platform: Components) -> None:
    name = f"ops-{os.urandom(4).hex()}"

    def login(password: str) -> httpx.Response:
        return httpx.post(
            f"{platform.api_url}/api/v1/auth/login",
            json={"username": name, "password": password},
            timeout=10,
        )

    made = users_cli(
        "set", name, "--role", "operator", "--password-stdin", stdin="first-password-1\n"
    )
    assert made.returncode == 0, made.stderr
    assert f"created {name} (operator, every site)" in made.stderr
    r = login("first-password-1")
    assert r.status_code == 200, r.text
    assert r.json()["role"] == "operator"

    changed = users_cli(
        "set", name, "--role", "viewer", "--password-stdin", stdin="second-password-2\n"
    )
    assert changed.returncode == 0, changed.stderr
    assert f"updated {name} (viewer, every site)" in changed.stderr
    assert login("first-password-1").status_code == 401
    again = login("second-password-2")
    assert again.status_code == 200, again.text
    assert again.json()["role"] == "viewer"

    short = users_cli("set", name, "--role", "admin", "--password-stdin", stdin="short\n")
    assert short.returncode != 0 and "at least 12" in short.stderr
    bad_role = users_cli(
        "set", name, "--role", "root", "--password-stdin", stdin="long-enough-pw\n"
    )
    assert bad_role.returncode != 0 and "unknown role" in bad_role.stderr
    assert login("second-password-2").json()["role"] == "viewer"  # refused changes changed nothing

    scoped = users_cli(
        "set",
        name,
        "--role",
        "viewer",
        "--sites",
        "site-y, site-x",
        "--password-stdin",
        stdin="second-password-2\n",
    )
    assert scoped.returncode == 0, scoped.stderr
    assert f"updated {name} (viewer, sites site-x, site-y)" in scoped.stderr
    kept = users_cli("set", name, "--role", "operator", "--password-stdin", stdin="third-pass-3\n")
    assert f"updated {name} (operator, sites site-x, site-y)" in kept.stderr  # sites kept
    admin_scoped = users_cli(
        "set",
        name,
        "--role",
        "admin",
        "--sites",
        "site-x",
        "--password-stdin",
        stdin="third-pass-3\n",
    )
    assert admin_scoped.returncode != 0 and "admin sees every site" in admin_scoped.stderr
    everywhere = users_cli(
        "set",
        name,
        "--role",
        "operator",
        "--all-sites",
        "--password-stdin",
        stdin="third-pass-3\n",
    )
    assert f"updated {name} (operator, every site)" in everywhere.stderr
