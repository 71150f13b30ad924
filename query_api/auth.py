"""Login, access tokens, roles and the demo users.

Tokens are HS256 JWTs (Litestar's JWTAuth) carrying the username and role. The role and the
sites a request acts with are the user's current ones, from the `users` table through a
per-process cache of 5 s (`query_api.users`): a change of role or sites, or a deleted user
(401), takes effect within 5 s; a cache hit costs one dict lookup.

Login attempts are counted in Redis per username and per client address before the password
is verified (a success takes its count back); past `LOGIN_MAX_FAILURES`
within `LOGIN_LOCKOUT_S` the login answers 429 with Retry-After without verifying, and at most
`LOGIN_MAX_VERIFICATIONS` argon2 checks run at once per process (503 past a 5 s wait).
While Redis cannot be reached the counts are kept in this process instead (logged, and counted
in `microgrid_login_throttle_local_total`): logins keep working and stay throttled, per API
process rather than across them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import psycopg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerifyMismatchError
from litestar import Request, post
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.plugins.problem_details import ProblemDetailsException
from litestar.security.jwt import JWTAuth, Token
from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError

from contracts.api import LoginRequest, Role, TokenResponse
from query_api.services import Services
from query_api.users import User, UserDirectory
from runtime.http import problem
from runtime.openapi import problems
from runtime.settings import DEV_TOKEN_SECRET, Settings

log = logging.getLogger("microgrid.api")

LOCAL_THROTTLE = Counter(
    "microgrid_login_throttle_local_total",
    "Login throttle checks and counts kept in the process because Redis could not be reached",
)

VERIFICATIONS = Counter(
    "microgrid_login_verifications_total", "Password verifications (argon2) made by logins"
)
VERIFY_SLOT_WAIT_S = 5.0

HASHER = PasswordHasher()
# Verified against when the username is unknown, so both cases cost the same time.
_DUMMY_HASH = HASHER.hash("not-a-real-password")


async def current_user(users: UserDirectory, token: Token) -> User:
    """The token's user with the role and sites the `users` table gives it now (cached 5 s);
    401 when the user no longer exists."""
    if token.extras.get("role") not in ROLES:
        raise PermissionDeniedException("token carries no valid role")
    user = await users.get(token.sub)
    if user is None:
        raise NotAuthorizedException("the token's user no longer exists")
    return user


def _user_from_token(
    users: UserDirectory,
) -> Callable[[Token, ASGIConnection[Any, Any, Any, Any]], Awaitable[User]]:
    async def retrieve(token: Token, connection: ASGIConnection[Any, Any, Any, Any]) -> User:
        return await current_user(users, token)

    return retrieve


def secret_problem(s: Settings) -> str | None:
    """Why the token secret is unfit for this environment, or None."""
    if not s.is_dev and (s.auth_token_secret == DEV_TOKEN_SECRET or len(s.auth_token_secret) < 32):
        return (
            "AUTH_TOKEN_SECRET must be set to a private value of at least 32 characters "
            f"outside dev (ENVIRONMENT={s.environment})"
        )
    return None


def startup_problem(s: Settings) -> str | None:
    """Why the API must not start with these settings, or None: ENVIRONMENT unset; outside
    dev and test, the repository's token secret (or a short one) or a repository demo
    password."""
    if reason := s.environment_problem:
        return reason
    if reason := secret_problem(s):
        return reason
    if not s.is_dev:
        demo = {str(Settings.model_fields[f"auth_{r}_password"].default) for r in ROLES}
        named = [f"AUTH_{r.upper()}_PASSWORD" for r in ROLES if _password(s, r) in demo]
        if named:
            return (
                f"{', '.join(named)} hold a demo password from the repository: outside dev"
                f" (ENVIRONMENT={s.environment}) set your own or leave them empty"
                " (no demo users are created there either way)"
            )
    return None


ROLES: tuple[Role, ...] = ("admin", "operator", "viewer")


def _password(s: Settings, role: Role) -> str:
    return str(getattr(s, f"auth_{role}_password"))


def jwt_auth(s: Settings, users: UserDirectory) -> JWTAuth[User, Token]:
    if reason := startup_problem(s):
        raise RuntimeError(reason)
    return JWTAuth[User, Token](
        retrieve_user_handler=_user_from_token(users),
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
        if connection.scope.get("method") == "OPTIONS":  # no credentials: says what is there
            return
        if connection.user.role not in roles:
            raise PermissionDeniedException(
                f"this needs the role {' or '.join(roles)}; you are {connection.user.role}"
            )

    return guard


OPERATORS = require("admin", "operator")
ADMINS = require("admin")


# Atomically: refuse (answer the seconds left) when a count is at its limit, else count the
# attempt on every key. The attempt is counted before the password is checked, so parallel
# attempts cannot all pass a check made before any of them failed.
_ATTEMPT = """
local window = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  if tonumber(redis.call('GET', key) or '0') >= tonumber(ARGV[i + 1]) then
    local ttl = redis.call('TTL', key)
    if ttl < 1 then ttl = window end
    return ttl
  end
end
for _, key in ipairs(KEYS) do
  redis.call('INCR', key)
  redis.call('EXPIRE', key, window, 'NX')
end
return 0
"""
# Take back one counted attempt (one that was not a failure) from the keys that still exist.
_UNCOUNT = """
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) and tonumber(redis.call('GET', key)) > 0 then
    redis.call('DECR', key)
  end
end
return 0
"""


class _LocalCounts:
    """The same counts in this process, for while Redis cannot be reached."""

    def __init__(self) -> None:
        self.counts: dict[str, tuple[int, float]] = {}

    def _get(self, key: str) -> tuple[int, float]:
        count, until = self.counts.get(key, (0, 0.0))
        if until <= time.monotonic():
            self.counts.pop(key, None)
            return 0, 0.0
        return count, until

    def attempt(self, limits: dict[str, int], window: int) -> int | None:
        for key, limit in limits.items():
            count, until = self._get(key)
            if count >= limit:
                return max(1, int(until - time.monotonic()))
        for key in limits:
            count, until = self._get(key)
            self.counts[key] = (count + 1, until or time.monotonic() + window)
        return None

    def uncount(self, keys: list[str]) -> None:
        for key in keys:
            count, until = self._get(key)
            if count > 0:
                self.counts[key] = (count - 1, until)

    def clear(self, key: str) -> None:
        self.counts.pop(key, None)


class LoginThrottle:
    """Login attempts per username and per client address, in Redis; in the process while
    Redis cannot be reached. An attempt is counted before its password is verified and taken
    back when it succeeds, so only failures (and attempts in flight) hold a count; past
    `max_failures` per username (four times that per address) within the window, attempts are
    refused without verifying anything. Verifications run at most `max_verifications` at once
    in this process (each argon2 check takes 64 MiB)."""

    def __init__(
        self,
        redis: Redis,
        max_failures: int,
        window_s: int,
        max_verifications: int = 4,
        prefix: str = "",
    ) -> None:
        self.redis = redis
        self.prefix = prefix  # the deployment's namespace (KAFKA_NAMESPACE), as for its streams
        self.local = _LocalCounts()
        self.max = max_failures
        self.window = window_s
        self.slots = asyncio.Semaphore(max_verifications)

    def _limits(self, username: str, client: str) -> dict[str, int]:
        return {
            f"{self.prefix}login-failures:user:{username}": self.max,
            f"{self.prefix}login-failures:addr:{client}": self.max * 4,
        }

    @staticmethod
    def _degraded(exc: RedisError) -> None:
        LOCAL_THROTTLE.inc()
        log.warning("login throttle kept in this process, Redis unavailable: %r", exc)

    async def attempt(self, username: str, client: str) -> int | None:
        """Count an attempt; None when it may go on, else the seconds until it may."""
        limits = self._limits(username, client)
        try:
            wait = int(
                await self.redis.eval(_ATTEMPT, len(limits), *limits, self.window, *limits.values())
            )
            return wait or None
        except RedisError as exc:
            self._degraded(exc)
        return self.local.attempt(limits, self.window)

    async def uncount(self, username: str, client: str) -> None:
        """Take back an attempt that was not a failure (no verification slot was free)."""
        keys = list(self._limits(username, client))
        self.local.uncount(keys)
        try:
            await self.redis.eval(_UNCOUNT, len(keys), *keys)
        except RedisError as exc:
            self._degraded(exc)

    async def succeeded(self, username: str, client: str) -> None:
        user_key, addr_key = self._limits(username, client)
        self.local.clear(user_key)
        self.local.uncount([addr_key])
        try:
            await self.redis.delete(user_key)
            await self.redis.eval(_UNCOUNT, 1, addr_key)
        except RedisError as exc:
            self._degraded(exc)


def _too_many(wait: int) -> ProblemDetailsException:
    return problem(
        429,
        "Too many failed logins",
        f"try again in {wait} s",
        headers={"Retry-After": str(wait)},
    )


@post(
    "/api/v1/auth/login",
    opt={"public": True, **problems(401, 429)},
    status_code=200,
    tags=["auth"],
)
async def login(
    data: LoginRequest,
    request: Request[Any, Any, Any],
    services: Services,
    throttle: LoginThrottle,
    tokens: TokenIssuer,
) -> TokenResponse:
    """Exchange a username and password for a bearer token."""
    client = request.client.host if request.client else "unknown"
    wait = await throttle.attempt(data.username, client)
    if wait is not None:
        raise _too_many(wait)
    try:
        await asyncio.wait_for(throttle.slots.acquire(), VERIFY_SLOT_WAIT_S)
    except TimeoutError:
        await throttle.uncount(data.username, client)
        raise problem(
            503,
            "Too many logins at once",
            "every password verification slot is busy: retry shortly",
            headers={"Retry-After": "1"},
        ) from None
    try:
        async with services.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT role, password_hash FROM users WHERE username = %s", (data.username,)
            )
            row = await cur.fetchone()
        stored = row[1] if row else _DUMMY_HASH
        VERIFICATIONS.inc()
        try:
            ok = await asyncio.to_thread(HASHER.verify, stored, data.password) and row is not None
        except (VerifyMismatchError, InvalidHashError):
            ok = False
    finally:
        throttle.slots.release()
    if not ok or row is None:
        raise problem(401, "Invalid credentials", "unknown username or wrong password")
    await throttle.succeeded(data.username, client)
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
    """Create or update the configured demo users; an unchanged password is not re-hashed.
    Only in dev and test: elsewhere no user is created or changed."""
    if not s.is_dev:
        return
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
