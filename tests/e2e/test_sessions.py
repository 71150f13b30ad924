"""Sessions (issue 15): the login throttle holds under parallel attempts, and a live stream ends
with `session.expired` when its token expires."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
from litestar.security.jwt import Token

from contracts import Events
from query_api.auth import HASHER
from tests.conftest import Components, free_port, wait_for
from tests.sse import SSEClient

LOCKOUT_S = 4


def verifications(api_url: str) -> float:
    text = httpx.get(f"{api_url}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith("microgrid_login_verifications_total "):
            return float(line.split()[1])
    return 0.0


async def parallel_logins(url: str, username: str, password: str, n: int) -> list[httpx.Response]:
    addr = f"127.{random.randint(1, 254)}.{random.randint(0, 254)}.{random.randint(1, 254)}"
    transport = httpx.AsyncHTTPTransport(local_address=addr)
    async with httpx.AsyncClient(base_url=url, transport=transport, timeout=30) as client:
        return list(
            await asyncio.gather(
                *(
                    client.post(
                        "/api/v1/auth/login", json={"username": username, "password": password}
                    )
                    for _ in range(n)
                )
            )
        )


def test_parallel_wrong_passwords_verify_at_most_the_limit_and_lock_the_account(
    platform: Components, db: psycopg.Connection
) -> None:
    username, password = f"qa-{uuid.uuid4().hex[:12]}", f"pw-{uuid.uuid4().hex}"
    db.execute(
        "INSERT INTO users (username, role, password_hash) VALUES (%s, 'viewer', %s)",
        (username, HASHER.hash(password)),
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    platform.start("api", alias="api-throttle", API_PORT=str(port), LOGIN_LOCKOUT_S=str(LOCKOUT_S))
    try:
        limit = platform.s.login_max_failures
        before = verifications(url)
        answers = asyncio.run(parallel_logins(url, username, "wrong", 50))
        statuses = sorted(r.status_code for r in answers)
        assert statuses.count(401) == limit, str(statuses)
        assert statuses.count(429) == 50 - limit, statuses
        for r in answers:
            if r.status_code == 429:
                assert r.headers["content-type"].startswith("application/problem+json")
                assert 1 <= int(r.headers["Retry-After"]) <= LOCKOUT_S
        assert verifications(url) - before == limit
        locked_at = time.monotonic()
        # the right password is refused while the lockout lasts, without a verification
        [right] = asyncio.run(parallel_logins(url, username, password, 1))
        assert right.status_code == 429, right.text
        assert verifications(url) - before == limit
        # and accepted once it has passed
        time.sleep(max(0.0, LOCKOUT_S + 1 - (time.monotonic() - locked_at)))
        [after] = asyncio.run(parallel_logins(url, username, password, 1))
        assert after.status_code == 200, after.text
    finally:
        platform.stop("api-throttle")


def test_stream_sends_session_expired_when_the_token_expires(platform: Components) -> None:
    s = platform.s
    expires = datetime.now(UTC) + timedelta(seconds=3)
    token = Token(sub=s.auth_viewer_username, exp=expires, extras={"role": "viewer"}).encode(
        s.auth_token_secret, "HS256"
    )
    sse = SSEClient(f"{platform.api_url}/api/v1/stream", token)
    try:
        assert sse.status == 200
        wait_for(lambda: sse.of(Events.SESSION_EXPIRED), 15, "session.expired")
        # the server ended the stream: the reader thread finishes on its own
        sse._thread.join(5)
        assert not sse._thread.is_alive()
        assert datetime.now(UTC) >= expires.replace(microsecond=0)  # exp is whole seconds
    finally:
        sse.close()
