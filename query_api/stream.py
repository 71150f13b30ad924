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
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from litestar import Request, get
from litestar.exceptions import NotAuthorizedException
from litestar.params import Parameter
from litestar.plugins.problem_details import ProblemDetailsException
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.security.jwt import Token
from redis.asyncio import Redis
from redis.exceptions import RedisError

from contracts import Events, Streams
from query_api.services import Services
from runtime.http import problem

HEARTBEAT_MS = 15_000  # below services.STREAM_READ_TIMEOUT_S
BATCH = 200
RETRY_AFTER_S = 5


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
    redis: Redis, key: str, cursor: str, notice: str | None, expires_at: float
) -> AsyncIterator[ServerSentEventMessage]:
    if notice:
        yield ServerSentEventMessage(event="error", data=f'{{"reason": "{notice}"}}')
    while True:
        left_ms = int((expires_at - time.time()) * 1000)
        if left_ms <= 0:  # the token has expired: say so and end; the client logs in again
            yield ServerSentEventMessage(
                event=Events.SESSION_EXPIRED, data='{"reason": "the access token expired"}'
            )
            return
        try:
            found: Any = await redis.xread(
                {key: cursor}, count=BATCH, block=max(1, min(HEARTBEAT_MS, left_ms))
            )
            full = bool(found) and len(found[0][1]) == BATCH
            first: Any = await redis.xrange(key, count=1) if full else None
        except RedisError:  # Redis gone (or the API stopping): end; the client reconnects
            return
        if not found:
            yield ServerSentEventMessage(comment="keep-alive")
            continue
        entries = found[0][1]
        if full and first and _older(cursor, first[0][0].decode()):
            yield ServerSentEventMessage(
                event="error", data='{"reason": "fell behind: events were dropped"}'
            )
            return
        for entry_id, fields in entries:
            cursor = entry_id.decode()
            yield ServerSentEventMessage(
                id=cursor, event=fields[b"event"].decode(), data=fields[b"data"].decode()
            )


@get("/api/v1/stream", opt={"public": True}, tags=["stream"])
async def stream(
    request: Request[Any, Any, Any],
    services: Services,
    access_token: Annotated[str | None, Parameter(description="for EventSource clients")] = None,
    last_event_id: Annotated[str | None, Parameter(header="Last-Event-ID")] = None,
) -> ServerSentEvent:
    """alert.*, notification.*, control.updated and device.latest events, as they happen;
    session.expired, then the end of the stream, when the token expires."""
    token = _authenticate(request, services, access_token)
    key = services.settings.topic(Streams.EVENTS)
    redis = services.stream_redis
    notice = None
    if last_event_id:
        try:
            _older(last_event_id, "0-0")
        except ValueError as exc:
            raise problem(400, "Invalid Last-Event-ID", "pass back an event id") from exc
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
    return ServerSentEvent(_events(redis, key, cursor, notice, token.exp.timestamp()))
