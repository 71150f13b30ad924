"""`GET /api/v1/stream`: live read-model changes as server-sent events.

Each client reads the capped Redis stream at its own pace with its own cursor, so a slow client
costs only its own bounded batch and never slows the others. A client that reconnects with
`Last-Event-ID` gets every event still in the stream after that id; one that fell so far behind
that its next event was trimmed gets an `error` event and is disconnected. Comments keep idle
connections alive through proxies. When the client's token expires the stream sends a
`session.expired` event and ends, so the client authenticates again.

While Redis cannot be reached the stream answers 503 (problem+json, `Retry-After`), and an open
stream ends; the projections hold the events of that time and publish them once Redis returns,
so a client that comes back with `Last-Event-ID` receives them.

A user scoped to sites receives only the events of their sites' devices: every event's data
names its `device_id`, whose owner comes from `services.owners` (a cache of the registry,
refreshed on a miss and dropped on a change); events of other sites, or of no registered
device, are left out. Clients of every site are not filtered at all. The user's role and sites
are read again (`query_api.users`, cached 5 s) at least every `RECHECK_MS`, so a change of
sites applies to an open stream within seconds, and a deleted user's stream ends with
`session.expired`. If an owner cannot be looked up (PostgreSQL away) the stream ends before the
events it could not check, and a client resuming with `Last-Event-ID` gets them later.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Final

import msgspec
from litestar import Request, get
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.params import Parameter
from litestar.plugins.problem_details import ProblemDetailsException
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.security.jwt import Token
from redis.asyncio import Redis
from redis.exceptions import RedisError

from contracts import Events, Streams
from query_api.auth import current_user
from query_api.services import Services
from query_api.users import User
from runtime.devices import RegistryUnavailable
from runtime.http import problem
from runtime.openapi import problems

log = logging.getLogger("microgrid.api")

HEARTBEAT_MS = 15_000  # below services.STREAM_READ_TIMEOUT_S
RECHECK_MS = 5_000  # the longest a stream waits before it reads its user's scope again
USER_LOOKUP_S = 1.0  # a re-read that takes longer keeps the scope known so far
UNKNOWN_CACHE_S: Final = 5.0  # a device found in no site is asked about again after this
MAX_UNKNOWN: Final = 10_000
BATCH = 200
RETRY_AFTER_S = 5


class _Subject(msgspec.Struct):
    """The only field of an event's data the filter reads (the others are skipped)."""

    device_id: str | None = None


_SUBJECT = msgspec.json.Decoder(_Subject)


class _Scope:
    """Which events one stream's user may receive, kept current while the stream is open."""

    def __init__(self, services: Services, user: User) -> None:
        self.services = services
        self.user = user
        self.unknown: dict[str, float] = {}  # device -> until when it counts as in no site

    async def refresh(self) -> bool:
        """Read the user's role and sites again (cached for 5 s); False if the user is gone.
        While PostgreSQL cannot be asked the scope known so far stays (nothing can change)."""
        try:
            user = await self.services.users.get(self.user.username, USER_LOOKUP_S)
        except Exception as exc:  # PoolTimeout, OperationalError: keep what is known
            log.debug("could not read user %s again: %r", self.user.username, exc)
            return True
        if user is None:
            return False
        self.user = user
        return True

    async def keep(self, entries: list[Any]) -> list[Any]:
        """The entries this user may see. Raises RegistryUnavailable when an owner cannot be
        looked up."""
        sites = self.user.sites
        if sites is None:
            return entries
        cached = self.services.owners.owners
        owner: dict[str, str | None] = {}  # of this batch's devices
        subjects: list[str | None] = []
        missing: set[str] = set()
        now = time.monotonic()
        for _, fields in entries:
            try:
                device = _SUBJECT.decode(fields[b"data"]).device_id
            except (msgspec.DecodeError, KeyError):
                device = None  # no device: no site says it is theirs
            subjects.append(device)
            if device is None or device in owner:
                continue
            site = cached.get(device)
            if site is None and self.unknown.get(device, 0.0) < now:
                missing.add(device)
            owner[device] = site
        if missing:
            found = await self.services.owners.resolve(missing)
            owner.update(found)
            if len(self.unknown) > MAX_UNKNOWN:
                self.unknown.clear()
            for device, site in found.items():
                if site is None:
                    self.unknown[device] = now + UNKNOWN_CACHE_S
        return [
            entry
            for entry, device in zip(entries, subjects, strict=True)
            if device is not None and owner[device] in sites
        ]


def _unavailable() -> ProblemDetailsException:
    return problem(
        503,
        "Live events unavailable",
        "the live event store (Redis) cannot be reached: retry later, resuming with"
        " Last-Event-ID; the events of this time are published when it returns",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def _authenticate(
    request: Request[Any, Any, Any], services: Services, query_token: str | None
) -> Token:
    scheme, _, header_token = request.headers.get("authorization", "").partition(" ")
    encoded = header_token if scheme.lower() == "bearer" and header_token else query_token
    if not encoded:
        raise problem(401, "Missing token", "send a bearer token, or access_token=<token>")
    try:
        token = Token.decode(encoded, services.settings.auth_token_secret, "HS256")
    except NotAuthorizedException as exc:
        raise problem(401, "Invalid token", str(exc.detail)) from exc
    return token


def _older(a: str, b: str) -> bool:
    ams, _, aseq = a.partition("-")
    bms, _, bseq = b.partition("-")
    return (int(ams), int(aseq or 0)) < (int(bms), int(bseq or 0))


async def _events(
    redis: Redis, key: str, cursor: str, notice: str | None, expires_at: float, scope: _Scope
) -> AsyncIterator[ServerSentEventMessage]:
    if notice:
        yield ServerSentEventMessage(event="error", data=f'{{"reason": "{notice}"}}')
    quiet_since = time.monotonic()  # when the client was last sent something
    while True:
        left_ms = int((expires_at - time.time()) * 1000)
        if left_ms <= 0:  # the token has expired: say so and end; the client logs in again
            yield ServerSentEventMessage(
                event=Events.SESSION_EXPIRED, data='{"reason": "the access token expired"}'
            )
            return
        try:
            found: Any = await redis.xread(
                {key: cursor}, count=BATCH, block=max(1, min(RECHECK_MS, left_ms))
            )
            full = bool(found) and len(found[0][1]) == BATCH
            first: Any = await redis.xrange(key, count=1) if full else None
        except RedisError:  # Redis gone (or the API stopping): end; the client reconnects
            return
        if not await scope.refresh():  # after the read: these events meet the current scope
            yield ServerSentEventMessage(
                event=Events.SESSION_EXPIRED, data='{"reason": "the user no longer exists"}'
            )
            return
        entries = found[0][1] if found else []
        if full and first and _older(cursor, first[0][0].decode()):
            yield ServerSentEventMessage(
                event="error", data='{"reason": "fell behind: events were dropped"}'
            )
            return
        try:
            kept = await scope.keep(entries)
        except RegistryUnavailable:  # unchecked events are not sent: the client resumes later
            return
        if entries:
            cursor = entries[-1][0].decode()  # the ones left out are passed over too
        for entry_id, fields in kept:
            yield ServerSentEventMessage(
                id=entry_id.decode(), event=fields[b"event"].decode(), data=fields[b"data"].decode()
            )
        now = time.monotonic()
        if kept:
            quiet_since = now
        elif (now - quiet_since) * 1000 >= HEARTBEAT_MS:
            yield ServerSentEventMessage(comment="keep-alive")
            quiet_since = now


# public to the app's authentication: the route checks the token itself (header or query)
EVENT_ID = re.compile(r"^[0-9]{1,19}-[0-9]{1,19}$")  # a Redis stream id


@get(
    "/api/v1/stream",
    opt={"public": True, "own_auth": True, **problems(401, 403)},
    tags=["stream"],
    media_type="text/event-stream",
)
async def stream(
    request: Request[Any, Any, Any],
    services: Services,
    access_token: Annotated[str | None, Parameter(description="for EventSource clients")] = None,
    last_event_id: Annotated[
        str | None,
        Parameter(header="Last-Event-ID", description="an event's id; another value is ignored"),
    ] = None,
) -> ServerSentEvent:
    """alert.*, notification.*, control.updated and device.latest events, as they happen (of
    the user's sites' devices); session.expired, then the end of the stream, when the token
    expires or the user is deleted."""
    token = _authenticate(request, services, access_token)
    try:
        user = await current_user(services.users, token)
    except (NotAuthorizedException, PermissionDeniedException) as exc:
        raise problem(exc.status_code, "Invalid token", str(exc.detail)) from exc
    key = services.settings.topic(Streams.EVENTS)
    redis = services.stream_redis
    notice = None
    if last_event_id is not None and not EVENT_ID.match(last_event_id):
        # not an id this stream gave: as a server may, ignore it, and say so
        last_event_id, notice = None, "Last-Event-ID is not an event id: events from now on"
    try:
        if last_event_id:
            cursor = last_event_id
            first: Any = await redis.xrange(key, count=1)
            if first and _older(cursor, first[0][0].decode()):
                # resumed too late: say so, then send what is left
                cursor, notice = "0-0", "resumed after events were dropped: reload the views"
        else:  # from the stream's current end: nothing appended after this point is missed
            last: Any = await redis.xrevrange(key, count=1)
            cursor = last[0][0].decode() if last else "0-0"
    except RedisError as exc:
        raise _unavailable() from exc
    scope = _Scope(services, user)
    return ServerSentEvent(_events(redis, key, cursor, notice, token.exp.timestamp(), scope))
