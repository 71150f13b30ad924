"""The benchmark's HTTP transport resends what may succeed later, against a scripted server
on a local socket (no platform)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest

from benchmarks.harness import HttpTransport
from benchmarks.http_client import HttpClient
from runtime.settings import Settings

READINGS = [{"device_id": "d-1", "ts": "2026-01-01T00:00:00.000001+00:00"}]


def answer(status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class Script:
    """Answers requests in turn with `answers` (the last one again and again); None closes
    the connection without an answer."""

    def __init__(self, answers: list[bytes | None]) -> None:
        self.answers = answers
        self.bodies: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                self.bodies.append(await reader.readexactly(length))
                reply = self.answers[min(len(self.bodies), len(self.answers)) - 1]
                if reply is None:
                    break
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


@pytest.fixture
async def server() -> AsyncIterator[tuple[Script, int]]:
    script = Script([])
    srv = await asyncio.start_server(script.serve, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    yield script, port
    srv.close()
    await srv.wait_closed()


def transport(port: int, deadline_s: float = 30.0) -> HttpTransport:
    s = Settings(gateway_host="127.0.0.1", gateway_port=port)
    return HttpTransport(s, "key", "batch", retry_deadline_s=deadline_s)


async def test_client_reads_retry_after_and_the_problem_of_a_refusal(
    server: tuple[Script, int],
) -> None:
    script, port = server
    problem = b'{"status":503,"outcome":"not stored"}'
    script.answers = [answer(503, {"Retry-After": "1"}, problem), answer(202, body=b"{}")]
    client = HttpClient("127.0.0.1", port)
    head = client.prepare("/x", {})
    assert await client.post(head, b"a") == (503, "1", problem)
    assert await client.post(head, b"b") == (202, None, b"")  # 2xx bodies are not kept
    await client.close()


async def test_503_and_429_and_lost_connections_are_resent_until_202(
    server: tuple[Script, int],
) -> None:
    script, port = server
    script.answers = [
        answer(503, {"Retry-After": "0"}),
        answer(429, {"retry-after": "0"}),
        None,
        answer(202),
    ]
    t = transport(port)
    t.policy = dataclasses.replace(t.policy, initial_s=0.01)  # the lost connection's backoff
    assert await t.send(READINGS) is None
    assert (t.retries, t.retried_requests) == (3, 1)
    assert len(set(script.bodies)) == 1 and len(script.bodies) == 4  # the same body each time
    await t.close()


async def test_other_errors_are_not_resent(server: tuple[Script, int]) -> None:
    script, port = server
    script.answers = [answer(422), answer(500), answer(202)]
    t = transport(port)
    assert await t.send(READINGS) == "4xx"
    assert await t.send(READINGS) == "5xx"
    assert t.retries == 0
    await t.close()


async def test_gives_up_at_the_deadline_with_the_last_error_class(
    server: tuple[Script, int],
) -> None:
    script, port = server
    script.answers = [answer(503, {"Retry-After": "0.4"})]
    t = transport(port, deadline_s=1.0)
    assert await t.send(READINGS) == "5xx"
    assert 1 <= t.retries <= 2
    await t.close()


async def test_without_a_deadline_nothing_is_resent(server: tuple[Script, int]) -> None:
    script, port = server
    script.answers = [answer(503, {"Retry-After": "0"}), answer(202)]
    t = transport(port, deadline_s=0)
    assert await t.send(READINGS) == "5xx"
    assert t.retries == 0 and len(script.bodies) == 1
    await t.close()
