"""The ingest routes' hot path: a thin ASGI front that serves `POST /api/v1/telemetry` and
`POST /api/v1/telemetry/batch` itself and hands every other request to the Litestar app.

Per request, Litestar's routing, connection objects, signature model, response objects and
middleware cost about 0.25 ms of CPU here, half of the gateway's work on a single reading
(py-spy, 100,000 requests/min). The front does the same work with less: it checks the key
(before reading anything of the body), reads the body (bounded by `INGEST_MAX_BODY_BYTES` and
in time by `INGEST_BODY_TIMEOUT_S`), calls `Gateway.ingest` (the same code the Litestar
handlers run), answers with the same JSON or problem+json, and counts the request in the same
Prometheus families as Litestar's middleware. The Litestar handlers stay: they define the
routes' OpenAPI contract and serve anything the front passes on (e.g. a trailing slash).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import msgspec
from litestar.plugins.problem_details import ProblemDetailsException
from litestar.plugins.prometheus import PrometheusConfig, PrometheusMiddleware

from ingest_gateway.gateway import Gateway
from runtime.http import problem

if TYPE_CHECKING:
    from litestar import Litestar
    from litestar.types import Receive, Scope, Send

log = logging.getLogger("microgrid.gateway")

ROUTES = {"/api/v1/telemetry": False, "/api/v1/telemetry/batch": True}  # path -> batch
_JSON = [(b"content-type", b"application/json")]
_PROBLEM = [(b"content-type", b"application/problem+json")]
_ACCEPTED_ONE = b'{"accepted":1}'


def body_too_large(max_body_bytes: int) -> ProblemDetailsException:
    return problem(413, "Request body too large", f"at most {max_body_bytes} bytes per request")


class RouteMetrics:
    """Counts the front's requests in Litestar's Prometheus families (`<prefix>_requests_total`,
    `_request_duration_seconds`, `_requests_in_progress`, `_requests_error_total`), with the
    labels its middleware gives them, so `/metrics` shows every route the same way."""

    def __init__(self, config: PrometheusConfig) -> None:
        families = PrometheusMiddleware(app=_never_called, config=config)
        labels: dict[str, str | int | float] = {
            "method": "POST",
            "path": "",
            "status_code": 0,
            "app_name": config.app_name,
        }
        self.app_name = config.app_name
        self.count = families.request_count(labels)
        self.time = families.request_time(labels)
        self.progress = families.requests_in_progress(labels)
        self.errors = families.requests_error_count(labels)
        self._done: dict[tuple[str, int], tuple[Any, Any, Any | None]] = {}
        self._running = {
            path: self.progress.labels("POST", path, 200, self.app_name) for path in ROUTES
        }

    def started(self, path: str) -> None:
        self._running[path].inc()

    def finished(self, path: str, status: int, seconds: float) -> None:
        self._running[path].dec()
        children = self._done.get((path, status))
        if children is None:
            values = ("POST", path, status, self.app_name)
            children = (
                self.count.labels(*values),
                self.time.labels(*values),
                self.errors.labels(*values) if status >= 500 else None,
            )
            self._done[(path, status)] = children
        count, duration, errors = children
        count.inc()
        duration.observe(seconds)
        if errors is not None:
            errors.inc()


async def _never_called(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("RouteMetrics only borrows the middleware's metric families")


class IngestFront:
    """ASGI app: the ingest routes served directly, everything else by `app`."""

    def __init__(
        self, app: Litestar, gateway: Gateway, *, max_body_bytes: int, metrics: RouteMetrics
    ) -> None:
        self.app = app
        self.gateway = gateway
        self.max_body = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in ROUTES or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        started = time.perf_counter()
        self.metrics.started(path)
        status = 500
        try:
            status = await self._ingest(scope, receive, send, ROUTES[path])
        finally:
            self.metrics.finished(path, status, time.perf_counter() - started)

    async def _ingest(self, scope: Scope, receive: Receive, send: Send, batch: bool) -> int:
        authorization, length = None, None
        for name, value in scope["headers"]:
            if name == b"authorization" and authorization is None:  # the first, as Litestar
                authorization = value.decode("latin-1")
            elif name == b"content-length":
                length = value
        try:
            # the key first: a request without a good key is answered before its body is read
            key = await self.gateway.authenticate(authorization or "")
            if length is not None and length.isdigit():
                if int(length) > self.max_body:
                    raise body_too_large(self.max_body)
                self.gateway.refuse_if_full(0, int(length))
            body = await self.gateway.read_body(self._body(receive))
            if body is None:  # the client went away before sending it all
                return 499
            accepted = await self.gateway.ingest(key, body, batch=batch)
        except ProblemDetailsException as exc:
            return await _send_problem(send, exc)
        except Exception:
            log.exception("unhandled error on POST %s", scope["path"])
            return await _send_problem(send, problem(500, "Internal server error"))
        payload = _ACCEPTED_ONE if accepted == 1 else b'{"accepted":%d}' % accepted
        await _send(send, 202, _JSON, payload)
        return 202

    async def _body(self, receive: Receive) -> bytes | None:
        """The whole body, or None if the client left first; a problem past the size limit."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message: Any = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise body_too_large(self.max_body)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)  # one chunk is returned as it is, not copied


async def _send(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    start: Any = {
        "type": "http.response.start",
        "status": status,
        "headers": [*headers, (b"content-length", b"%d" % len(body))],
    }
    await send(start)
    end: Any = {"type": "http.response.body", "body": body}
    await send(end)


async def _send_problem(send: Send, exc: ProblemDetailsException) -> int:
    """The body Litestar's problem-details plugin would render for `exc`."""
    status = exc.status_code
    details: dict[str, Any] = {"status": status}
    if exc.title is not None:
        details["title"] = exc.title
    if exc.detail is not None:
        details["detail"] = exc.detail
    if isinstance(exc.extra, dict):
        details.update(exc.extra)
    headers = [*_PROBLEM]
    for name, value in (exc.headers or {}).items():
        headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    await _send(send, status, headers, msgspec.json.encode(details))
    return status
