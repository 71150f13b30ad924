"""The load generator's HTTP/1.1 client: keep-alive connections, one request at a time on
each, responses parsed by httptools (llhttp, the parser uvicorn uses).

The load generator shares the machine with the platform, so every microsecond it spends per
request is taken from what it measures. aiohttp cost about 250 us of CPU per request here;
this client sends prepared bytes and reads only the status line, headers and body length.
"""

from __future__ import annotations

import asyncio
import time
from typing import NamedTuple

import httptools

# uvicorn closes a connection idle for 5 s: one idle for longer than this is not reused, so a
# request never races the server's close
MAX_IDLE_S = 4.0


class Answer(NamedTuple):
    status: int
    retry_after: str | None  # the `Retry-After` header, if any
    body: bytes  # only of answers other than 2xx (a problem document): 202s are not kept


class _Connection(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Answer] | None = None
        self.closed = False
        self.idle_since = 0.0
        self.retry_after: str | None = None
        self.keep_body = False
        self.body = b""

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"bad HTTP response: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionError("connection closed by the server"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) == 11 and name.lower() == b"retry-after":
            self.retry_after = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.keep_body = not 200 <= self.parser.get_status_code() < 300

    def on_body(self, body: bytes) -> None:
        if self.keep_body:
            self.body += body

    def on_message_complete(self) -> None:
        if not self.parser.should_keep_alive():
            self.close()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(
                Answer(self.parser.get_status_code(), self.retry_after, self.body)
            )

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    async def request(self, raw: bytes) -> Answer:
        assert self.transport is not None
        self.retry_after, self.keep_body, self.body = None, False, b""
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter


class HttpClient:
    """Keep-alive connections to one host, opened as needed (the caller bounds how many
    requests are in flight); `post` returns the answer's status, `Retry-After` and the body
    of an answer other than 2xx."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.idle: list[_Connection] = []

    def prepare(self, path: str, headers: dict[str, str]) -> bytes:
        """The request head without Content-Length, for `post`."""
        lines = [f"POST {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n").encode()

    async def post(self, head: bytes, body: bytes, timeout_s: float = 10.0) -> Answer:
        """The answer's status, `Retry-After` and (unless 2xx) body. Raises OSError
        (ConnectionError) or TimeoutError when no answer came in time, connecting included."""
        conn: _Connection | None = None
        raw = b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body)
        try:
            async with asyncio.timeout(timeout_s):
                conn = await self._connection()
                answer = await conn.request(raw)
        except BaseException:
            if conn is not None:
                conn.close()  # a late answer must not be read as the next request's
            raise
        if not conn.closed:
            conn.idle_since = time.monotonic()
            self.idle.append(conn)
        return answer

    async def _connection(self) -> _Connection:
        fresh = time.monotonic() - MAX_IDLE_S
        while self.idle:
            conn = self.idle.pop()
            if not conn.closed and conn.idle_since >= fresh:
                return conn
            conn.close()
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Connection, self.host, self.port)
        return conn

    async def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()
