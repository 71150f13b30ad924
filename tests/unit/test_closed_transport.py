"""A write to a connection the broker closed is a connection error aiokafka retries, also on
uvloop (which raises RuntimeError there, aio-libs/aiokafka#1038), not an error that ends a
consumer's group coordination for good."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.conn import AIOKafkaConnection
from aiokafka.errors import KafkaConnectionError

from runtime.kafka import closed_transport_is_a_connection_error

CLOSED = "unable to perform operation on <TCPTransport closed=True>; the handler is closed"


class Request:
    """Any request: its bytes do not matter, only the write."""

    def prepare(self, versions: Any) -> Request:
        return self

    def build_request_header(self, correlation_id: int, client_id: str) -> Request:
        return self

    def encode(self) -> bytes:
        return b"request"


class ClosedWriter:
    def write(self, data: bytes) -> None:
        raise RuntimeError(CLOSED)  # what uvloop's transport raises

    def close(self) -> None:
        pass


def connection() -> Any:
    conn: Any = AIOKafkaConnection("127.0.0.1", 9092)
    conn._writer = ClosedWriter()
    conn._versions = {}
    return conn


def test_a_write_to_a_closed_transport_is_a_connection_error() -> None:
    closed_transport_is_a_connection_error()
    closed_transport_is_a_connection_error()  # idempotent

    async def scenario() -> None:
        conn = connection()
        with pytest.raises(KafkaConnectionError, match="broken"):
            conn.send(Request())

    asyncio.run(scenario())


def test_other_runtime_errors_are_left_alone() -> None:
    closed_transport_is_a_connection_error()

    class Failing(ClosedWriter):
        def write(self, data: bytes) -> None:
            raise RuntimeError("something else")

    async def scenario() -> None:
        conn = connection()
        conn._writer = Failing()
        with pytest.raises(RuntimeError, match="something else"):
            conn.send(Request())

    asyncio.run(scenario())
