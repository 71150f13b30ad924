"""`GET /api/v1/stream`: live read-model changes as server-sent events.

Two Redis streams feed it (`runtime.events`): the events stream (alert.*, notification.*,
control.updated), trimmed by time (`EVENT_RETENTION_S`, 15 min), and the latest stream
(device.latest), capped by count (`LATEST_STREAM_MAXLEN`) and lossy by design. Each client
reads both in one blocking XREAD, at its own pace with its own cursors, so a slow client costs
only its own bounded batches and never slows the others. Comments keep idle connections alive
through proxies. When the client's token expires the stream sends a `session.expired` event and
ends, so the client authenticates again.

Ids. Every event has `id:`, `event:` and JSON `data:`. The events stream's cursor is the
reliable one: an alert, notification or control event's id is its entry id there, and a
device.latest event carries the client's current position in the events stream (its last entry
read for this client, those the filters left out included, or where the stream stood when the
client connected), so the browser's Last-Event-ID always names a reliable position. The stream
opens with that position alone (`id:` and a comment, no event: browsers keep it for their own
reconnection and dispatch nothing), so a client that loses the connection before any event
still resumes from where it started; keep-alive comments carry the position too. A client
that reconnects with `Last-Event-ID` (or `last_event_id=`, for an EventSource the client has to
re-create, after a 401 or a 503, which cannot set the header; the header wins) gets every event
of the events stream still there after that id. The latest feed is never resumed: it starts at
its end when the stream opens, and a client reloads latest values from `GET /api/v1/devices`
after reconnecting.

Dropped events. Each XADD trims only the events older than the retention before it. A client
resuming from an id after which events may have been trimmed (the stream no longer holds the
id, and the id is older than the retention before the newest event), or from a stream Redis
lost, gets an `error` event "resumed after events were dropped: reload the views", then every
event still in the stream. A client that has not caught up with the events stream for half the
retention is checked the same way as it reads; one that fell behind past the trimming gets an
`error` event and is disconnected. (Redis does not say which entries a trim removed, so an id
older than the retention that the stream no longer holds counts as dropped even when nothing
came between it and the stream's first event.)

While Redis cannot be reached the stream answers 503 (problem+json, `Retry-After`), and an open
stream ends; the projections hold the events of that time and publish them once Redis returns,
so a client that comes back with `Last-Event-ID` receives them.

Filters (query parameters, each repeatable or a comma-separated list): `site_id` (the events of
those sites' devices), `device_id`, and `event` (event names; another name answers 400 with the
names there are). session.expired and error events are always sent. Entries left out by a
filter or by the user's scope still advance the cursor.

A user scoped to sites receives only the events of their sites' devices: every event's data
names its `device_id`, whose owner comes from `services.owners` (a cache of the registry,
refreshed on a miss and dropped on a change); events of other sites, or of no registered
device, are left out. The `site_id` filter uses the same owner and narrows the user's sites (a
site outside them yields nothing). Clients of every site without a filter are not filtered at
all. The user's role and sites are read again (`query_api.users`, cached 5 s) at least every
`RECHECK_MS`, so a change of sites applies to an open stream within seconds, and a deleted
user's stream ends with `session.expired`. If an owner cannot be looked up (PostgreSQL away)
the stream ends before the events it could not check, and a client resuming with
`Last-Event-ID` gets them later.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any, Final, NamedTuple

import msgspec
from litestar import Request, get
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.openapi.spec import OpenAPIType, Schema
from litestar.params import Parameter
from litestar.plugins.problem_details import ProblemDetailsException
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.security.jwt import Token
from msgspec import Meta
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError
from redis.typing import KeyT, StreamIdT

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
BATCH = 200  # entries per stream per read
RETRY_AFTER_S = 5
ORIGIN: Final = "0-0"  # the position before every entry of a stream
# How far the clocks of the processes that publish (and trim) may run ahead of Redis's.
CLOCK_SKEW_MS: Final = 60_000

# The events the streams carry, which the `event` filter names (session.expired comes from
# the API itself and is always sent).
FEED: Final = tuple(
    name
    for attribute, name in vars(Events).items()
    if attribute.isupper() and name != Events.SESSION_EXPIRED
)
_ID = r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}"  # contracts.readings.Identifier
IDS_PATTERN: Final = rf"^{_ID}(,{_ID})*(?!\n)$"
_NAME = "|".join(re.escape(name) for name in FEED)
EVENTS_PATTERN: Final = rf"^({_NAME})(,({_NAME}))*(?!\n)$"


def _items(pattern: str) -> dict[str, Any]:
    """The document's schema of a repeatable parameter: one value or several, each matching
    the pattern (a query value is a string anyway: a single one is the same on the wire)."""
    return {
        "one_of": None,
        "type": [OpenAPIType.ARRAY, OpenAPIType.STRING],
        "pattern": pattern,
        "items": Schema(type=OpenAPIType.STRING, pattern=pattern),
    }


Ids = list[Annotated[str, Meta(pattern=IDS_PATTERN)]]


class _Subject(msgspec.Struct):
    """The only field of an event's data the filter reads (the others are skipped)."""

    device_id: str | None = None


_SUBJECT = msgspec.json.Decoder(_Subject)


def _subject(fields: dict[bytes, bytes]) -> str | None:
    try:
        return _SUBJECT.decode(fields[b"data"]).device_id
    except (msgspec.DecodeError, KeyError):
        return None  # no device: no site says it is theirs


class _Wanted(NamedTuple):
    """What the client asked for (None: not filtered by it)."""

    sites: frozenset[str] | None = None
    devices: frozenset[str] | None = None
    events: frozenset[bytes] | None = None


class _Scope:
    """Which events one stream sends: those its client asked for, of its user's sites, kept
    current while the stream is open."""

    def __init__(self, services: Services, user: User, wanted: _Wanted) -> None:
        self.services = services
        self.user = user
        self.wanted = wanted
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

    def _sites(self) -> frozenset[str] | None:
        mine, asked = self.user.sites, self.wanted.sites
        if mine is None or asked is None:
            return asked if mine is None else mine
        return mine & asked

    async def allowed(self, entries: list[dict[bytes, bytes]]) -> list[bool]:
        """Whether each entry (its fields) is sent. Raises RegistryUnavailable when an owner
        cannot be looked up."""
        wanted, sites = self.wanted, self._sites()
        verdict = [
            wanted.events is None or fields.get(b"event") in wanted.events for fields in entries
        ]
        if wanted.devices is None and sites is None:
            return verdict
        subjects: list[str | None] = []
        for fields, named in zip(entries, verdict, strict=True):
            device = _subject(fields) if named else None
            if device is not None and wanted.devices is not None and device not in wanted.devices:
                device = None
            subjects.append(device)
        if sites is None:
            return [device is not None for device in subjects]
        if not sites:
            return [False] * len(entries)
        owner = await self._owners({device for device in subjects if device is not None})
        return [device is not None and owner[device] in sites for device in subjects]

    async def _owners(self, devices: set[str]) -> dict[str, str | None]:
        cached = self.services.owners.owners
        owner: dict[str, str | None] = {}
        missing: set[str] = set()
        now = time.monotonic()
        for device in devices:
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
        return owner


def _unavailable() -> ProblemDetailsException:
    return problem(
        503,
        "Live events unavailable",
        "the live event store (Redis) cannot be reached: retry later, resuming with"
        " Last-Event-ID (or last_event_id); the events of this time are published when it"
        " returns",
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


def _order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _older(a: str, b: str) -> bool:
    return _order(a) < _order(b)


async def _info(redis: Redis, key: str) -> dict[str, Any] | None:
    """XINFO STREAM, or None when there is no such stream."""
    try:
        info: dict[str, Any] = await redis.xinfo_stream(key)
    except ResponseError as exc:
        if "no such key" in str(exc).lower():
            return None
        raise
    return info


async def _end(redis: Redis, key: str) -> str:
    """The stream's current end: reading after it gets what is appended from now on."""
    info = await _info(redis, key)
    return ORIGIN if info is None else info["last-generated-id"].decode()


async def dropped_after(redis: Redis, key: str, cursor: str, retention_ms: int) -> bool:
    """Whether events after `cursor` may have left the events stream unread: trimmed (each
    XADD trims what is older than the retention before it) or lost with Redis's data."""
    info = await _info(redis, key)
    if info is None:  # no stream: lost with Redis's data, unless the cursor is from before it
        return cursor != ORIGIN
    added, length = info.get("entries-added"), info["length"]
    if cursor == ORIGIN:  # before the first event: gone only if something was removed
        return added is None or added > length
    first = info.get("first-entry")
    if first and not _older(cursor, first[0].decode()):
        return False  # the stream still holds the cursor's position and everything after it
    if first and added == length:
        return True  # nothing ever removed, yet it starts after the cursor: not its stream
    last = info["last-generated-id"].decode()
    newest_ms = _order(last)[0]
    return _older(cursor, last) and _order(cursor)[0] < newest_ms - retention_ms + CLOCK_SKEW_MS


@dataclass
class _Position:
    key: str  # the events stream
    cursor: str  # the last entry of it read for the client: the reliable position
    latest_key: str | None  # the latest stream, None when device.latest is not wanted
    latest: str  # the last entry of it read for the client
    caught_up: float  # when (monotonic) the client last had every entry of the events stream
    retention_ms: int


async def _events(
    redis: Redis, at: _Position, notice: str | None, expires_at: float, scope: _Scope
) -> AsyncIterator[ServerSentEventMessage]:
    if notice:
        yield ServerSentEventMessage(event="error", data=f'{{"reason": "{notice}"}}')
    # The position it starts from, as an id without an event (browsers keep it for their
    # reconnection and dispatch nothing): a client that loses the connection before any event
    # resumes from here and misses nothing.
    yield ServerSentEventMessage(id=at.cursor, comment="position", data=None)
    quiet_since = time.monotonic()  # when the client was last sent something
    while True:
        left_ms = int((expires_at - time.time()) * 1000)
        if left_ms <= 0:  # the token has expired: say so and end; the client logs in again
            yield ServerSentEventMessage(
                event=Events.SESSION_EXPIRED, data='{"reason": "the access token expired"}'
            )
            return
        streams: dict[KeyT, StreamIdT] = {at.key: at.cursor}
        if at.latest_key is not None:
            streams[at.latest_key] = at.latest
        asked = time.monotonic()
        try:
            found: Any = await redis.xread(
                streams, count=BATCH, block=max(1, min(RECHECK_MS, left_ms))
            )
            read = {key.decode(): entries for key, entries in found or []}
            events = read.get(at.key, [])
            fresh = read.get(at.latest_key, []) if at.latest_key is not None else []
            # Events after the cursor can have been trimmed only if they are older than the
            # retention; all of them came after the client last caught up.
            behind = (
                bool(events)
                and (asked - at.caught_up) * 1000 > at.retention_ms / 2
                and await dropped_after(redis, at.key, at.cursor, at.retention_ms)
            )
        except RedisError:  # Redis gone (or the API stopping): end; the client reconnects
            return
        if len(events) < BATCH:
            at.caught_up = asked  # it read everything the events stream had then
        if not await scope.refresh():  # after the read: these events meet the current scope
            yield ServerSentEventMessage(
                event=Events.SESSION_EXPIRED, data='{"reason": "the user no longer exists"}'
            )
            return
        if behind:
            yield ServerSentEventMessage(
                event="error", data='{"reason": "fell behind: events were dropped"}'
            )
            return
        # both streams' entries in the order Redis appended them (ids are its clock)
        merged = sorted(
            [(entry_id.decode(), fields, False) for entry_id, fields in events]
            + [(entry_id.decode(), fields, True) for entry_id, fields in fresh],
            key=lambda entry: _order(entry[0]),
        )
        try:
            verdict = await scope.allowed([fields for _, fields, _ in merged])
        except RegistryUnavailable:  # unchecked events are not sent: the client resumes later
            return
        sent = False
        for (entry_id, fields, latest), send in zip(merged, verdict, strict=True):
            if not latest:
                at.cursor = entry_id  # the ones left out are passed over too
            if send:
                sent = True
                # a device.latest event names the reliable position: the events cursor
                yield ServerSentEventMessage(
                    id=at.cursor, event=fields[b"event"].decode(), data=fields[b"data"].decode()
                )
        if fresh:
            at.latest = fresh[-1][0].decode()
        now = time.monotonic()
        if sent:
            quiet_since = now
        elif (now - quiet_since) * 1000 >= HEARTBEAT_MS:
            # with the position: a filtered client's id keeps up with the stream while quiet
            yield ServerSentEventMessage(id=at.cursor, comment="keep-alive", data=None)
            quiet_since = now


# public to the app's authentication: the route checks the token itself (header or query)
EVENT_ID = re.compile(r"^[0-9]{1,19}-[0-9]{1,19}$")  # a Redis stream id


DESCRIPTION: Final = """\
alert.*, notification.*, control.updated and device.latest events as they happen, of the
user's sites' devices; session.expired, then the end of the stream, when the token expires or
the user is deleted. Every event has `id:`, `event:` and JSON `data:`.

Resuming: alert, notification and control events are kept for EVENT_RETENTION_S (15 min)
whatever the telemetry volume. Their id is their position in that stream, and a device.latest
event carries the position of the last of them read for this client (or where the stream stood
when it connected), so the Last-Event-ID header (or `last_event_id`, for an EventSource the
client re-creates; the header wins) resumes them exactly. A client resuming after events were
dropped gets an `error` event, then what is left; one that falls behind the trimming gets an
`error` event and is disconnected.

device.latest events are a lossy feed, never resumed: it starts when the stream opens; after a
reconnection, reload latest values from GET /api/v1/devices.

Filters (each repeatable or comma-separated): `site_id` (within the user's sites), `device_id`,
`event` (an unknown name answers 400). Events left out still advance the position."""


def _values(values: list[str] | None) -> frozenset[str] | None:
    """A repeatable, comma-separated parameter's values."""
    if values is None:
        return None
    return frozenset(part for value in values for part in value.split(","))


@get(
    "/api/v1/stream",
    # a last_event_id that is no event id (a NUL in it, say) is answered with an `error`
    # event, and access_token is read only without an Authorization header: neither refuses
    # a NUL, so the document gives them no NUL-free pattern
    opt={
        "public": True,
        "own_auth": True,
        "accepts_nul": ("access_token", "last_event_id", "Last-Event-ID"),
        **problems(400, 401, 403),
    },
    tags=["stream"],
    media_type="text/event-stream",
    description=DESCRIPTION,
)
async def stream(
    request: Request[Any, Any, Any],
    services: Services,
    access_token: Annotated[str | None, Parameter(description="for EventSource clients")] = None,
    last_event_id: Annotated[
        str | None,
        Parameter(header="Last-Event-ID", description="an event's id; another value is ignored"),
    ] = None,
    last_event_id_query: Annotated[
        str | None,
        Parameter(
            query="last_event_id",
            description="as the Last-Event-ID header (which wins), for an EventSource the client"
            " re-creates: it cannot set the header",
        ),
    ] = None,
    site_id: Annotated[
        Ids | None,
        Parameter(
            description="only the events of these sites' devices (repeatable or"
            " comma-separated; within the user's sites)",
            schema_extra=_items(IDS_PATTERN),
        ),
    ] = None,
    device_id: Annotated[
        Ids | None,
        Parameter(
            description="only the events of these devices (repeatable or comma-separated)",
            schema_extra=_items(IDS_PATTERN),
        ),
    ] = None,
    event: Annotated[
        list[str] | None,
        Parameter(
            description="only these events (repeatable or comma-separated): " + ", ".join(FEED),
            schema_extra=_items(EVENTS_PATTERN),
        ),
    ] = None,
) -> ServerSentEvent:
    """See DESCRIPTION."""
    token = _authenticate(request, services, access_token)
    try:
        user = await current_user(services.users, token)
    except (NotAuthorizedException, PermissionDeniedException) as exc:
        raise problem(exc.status_code, "Invalid token", str(exc.detail)) from exc
    names = _values(event)
    if names is not None and not names <= set(FEED):
        unknown = ", ".join(sorted(names - set(FEED)))
        raise problem(
            400,
            "Unknown event",
            f"no event {unknown}: the events are {', '.join(FEED)}",
            events=list(FEED),
        )
    wanted = _Wanted(
        _values(site_id),
        _values(device_id),
        None if names is None else frozenset(name.encode() for name in names),
    )
    s = services.settings
    key = s.topic(Streams.EVENTS)
    latest_key = s.topic(Streams.LATEST) if names is None or Events.DEVICE_LATEST in names else None
    redis = services.stream_redis
    retention_ms = s.event_retention_s * 1000
    resume, named = last_event_id, "Last-Event-ID"
    if resume is None:
        resume, named = last_event_id_query, "last_event_id"
    notice = None
    if resume is not None and not EVENT_ID.match(resume):
        # not an id this stream gave: as a server may, ignore it, and say so
        resume, notice = None, f"{named} is not an event id: events from now on"
    try:
        if resume:
            cursor = resume
            # all it has not read came after it: as old as the cursor
            caught_up = time.monotonic() - max(0.0, time.time() - _order(resume)[0] / 1000)
            if await dropped_after(redis, key, resume, retention_ms):
                # resumed too late: say so, then send what is left
                cursor, notice = ORIGIN, "resumed after events were dropped: reload the views"
                caught_up = time.monotonic()
        else:  # from the stream's current end: nothing appended after this point is missed
            cursor, caught_up = await _end(redis, key), time.monotonic()
        latest = await _end(redis, latest_key) if latest_key is not None else ORIGIN
    except RedisError as exc:
        raise _unavailable() from exc
    at = _Position(key, cursor, latest_key, latest, caught_up, retention_ms)
    scope = _Scope(services, user, wanted)
    return ServerSentEvent(_events(redis, at, notice, token.exp.timestamp(), scope))
