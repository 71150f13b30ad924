"""Login, access tokens, roles and the demo users.

Tokens are HS256 JWTs (Litestar's JWTAuth) carrying the username and role, so a request costs
no database read. Failed logins are counted in Redis per username and per client address;
past `LOGIN_MAX_FAILURES` within `LOGIN_LOCKOUT_S` the login answers 429 with Retry-After.
While Redis cannot be reached the counts are kept in this process instead (logged, and counted
in `microgrid_login_throttle_local_total`): logins keep working and stay throttled, per API
process rather than across them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerifyMismatchError
from limits.aio.storage import MemoryStorage
from litestar import Request, post
from litestar.connection import ASGIConnection
from litestar.exceptions import PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.security.jwt import JWTAuth, Token
from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from contracts.api import LoginRequest, Role, TokenResponse
from query_api.services import Services
from runtime.http import problem
from runtime.settings import DEV_TOKEN_SECRET, Settings

log = logging.getLogger("microgrid.api")

LOCAL_THROTTLE = Counter(
    "microgrid_login_throttle_local_total",
    "Login throttle checks and counts kept in the process because Redis could not be reached",
)

HASHER = PasswordHasher()
# Verified against when the username is unknown, so both cases cost the same time.
_DUMMY_HASH = HASHER.hash("not-a-real-password")


@dataclass(frozen=True)
class User:
    username: str
    role: Role


async def _user_from_token(token: Token, connection: ASGIConnection[Any, Any, Any, Any]) -> User:
    role = token.extras.get("role")
    if role not in ("admin", "operator", "viewer"):
        raise PermissionDeniedException("token carries no valid role")
    return User(username=token.sub, role=role)


def secret_problem(s: Settings) -> str | None:
    """Why the token secret is unfit for this environment, or None."""
    if not s.is_dev and (s.auth_token_secret == DEV_TOKEN_SECRET or len(s.auth_token_secret) < 32):
        return (
            "AUTH_TOKEN_SECRET must be set to a private value of at least 32 characters "
            f"outside dev (ENVIRONMENT={s.environment})"
        )
    return None


def jwt_auth(s: Settings) -> JWTAuth[User, Token]:
    if reason := secret_problem(s):
        raise RuntimeError(reason)
    return JWTAuth[User, Token](
        retrieve_user_handler=_user_from_token,
        token_secret=s.auth_token_secret,
        default_token_expiration=timedelta(seconds=s.auth_token_ttl_s),
        exclude_opt_key="public",
        exclude=["^/docs"],
    )


class TokenIssuer:
    """Signs access tokens for the login route."""

    def __init__(self, auth: JWTAuth[User, Token]) -> None:
        self.auth = auth
        self.ttl_s = int(auth.default_token_expiration.total_seconds())

    def issue(self, username: str, role: Role) -> str:
        return self.auth.create_token(identifier=username, token_extras={"role": role})


def require(*roles: Role) -> Any:
    """A guard that lets only these roles through (403 for the others)."""

    def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        if connection.user.role not in roles:
            raise PermissionDeniedException(
                f"this needs the role {' or '.join(roles)}; you are {connection.user.role}"
            )

    return guard


OPERATORS = require("admin", "operator")
ADMINS = require("admin")


class LoginThrottle:
    """Failed logins per username and per client address, in Redis; in the process (limits'
    memory storage, entries expiring with their window) while Redis cannot be reached."""

    def __init__(self, redis: Redis, max_failures: int, window_s: int) -> None:
        self.redis = redis
        self.local = MemoryStorage()
        self.max = max_failures
        self.window = window_s

    def _keys(self, username: str, client: str) -> list[str]:
        return [f"login-failures:user:{username}", f"login-failures:addr:{client}"]

    def _limit(self, key: str) -> int:
        return self.max if ":user:" in key else self.max * 4

    @staticmethod
    def _degraded(exc: RedisError) -> None:
        LOCAL_THROTTLE.inc()
        log.warning("login throttle kept in this process, Redis unavailable: %r", exc)

    async def retry_after(self, username: str, client: str) -> int | None:
        try:
            for key in self._keys(username, client):
                count = await self.redis.get(key)
                if count is not None and int(count) >= self._limit(key):
                    return max(1, int(await self.redis.ttl(key)))
            return None
        except RedisError as exc:
            self._degraded(exc)
        for key in self._keys(username, client):
            if await self.local.get(key) >= self._limit(key):
                return max(1, int(await self.local.get_expiry(key) - time.time()))
        return None

    async def failed(self, username: str, client: str) -> None:
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                for key in self._keys(username, client):
                    pipe.incr(key)
                    pipe.expire(key, self.window, nx=True)
                await pipe.execute()
        except RedisError as exc:
            self._degraded(exc)
            for key in self._keys(username, client):
                await self.local.incr(key, self.window)

    async def succeeded(self, username: str) -> None:
        key = self._keys(username, "")[0]
        await self.local.clear(key)
        try:
            await self.redis.delete(key)
        except RedisError as exc:
            self._degraded(exc)


@post("/api/v1/auth/login", opt={"public": True}, status_code=200, tags=["auth"])
async def login(
    data: LoginRequest,
    request: Request[Any, Any, Any],
    services: Services,
    throttle: LoginThrottle,
    tokens: TokenIssuer,
) -> TokenResponse:
    """Exchange a username and password for a bearer token."""
    client = request.client.host if request.client else "unknown"
    wait = await throttle.retry_after(data.username, client)
    if wait is not None:
        raise problem(
            429,
            "Too many failed logins",
            f"try again in {wait} s",
            headers={"Retry-After": str(wait)},
        )
    async with services.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT role, password_hash FROM users WHERE username = %s", (data.username,)
        )
        row = await cur.fetchone()
    stored = row[1] if row else _DUMMY_HASH
    try:
        ok = await asyncio.to_thread(HASHER.verify, stored, data.password) and row is not None
    except (VerifyMismatchError, InvalidHashError):
        ok = False
    if not ok or row is None:
        await throttle.failed(data.username, client)
        raise problem(401, "Invalid credentials", "unknown username or wrong password")
    await throttle.succeeded(data.username)
    return TokenResponse(
        access_token=tokens.issue(data.username, row[0]),
        token_type="Bearer",
        expires_in=tokens.ttl_s,
        role=row[0],
    )


def demo_users(s: Settings) -> list[tuple[str, str, Role]]:
    users: list[tuple[str, str, Role]] = [
        (s.auth_admin_username, s.auth_admin_password, "admin"),
        (s.auth_operator_username, s.auth_operator_password, "operator"),
        (s.auth_viewer_username, s.auth_viewer_password, "viewer"),
    ]
    return [u for u in users if u[0] and u[1]]


def ensure_demo_users(conn: psycopg.Connection, s: Settings) -> None:
    """Create or update the configured demo users; an unchanged password is not re-hashed."""
    for username, password, role in demo_users(s):
        row = conn.execute(
            "SELECT password_hash, role FROM users WHERE username = %s", (username,)
        ).fetchone()
        if row is not None and row[1] == role:
            try:
                HASHER.verify(row[0], password)
                continue
            except (VerifyMismatchError, InvalidHashError):
                pass
        conn.execute(
            "INSERT INTO users (username, role, password_hash) VALUES (%s, %s, %s)"
            " ON CONFLICT (username) DO UPDATE SET role = EXCLUDED.role,"
            " password_hash = EXCLUDED.password_hash, updated_at = now()",
            (username, role, HASHER.hash(password)),
        )
