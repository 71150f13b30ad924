"""The order of a redrive against PostgreSQL: rows inserted, records sent and acknowledged, then
the commit. A send that fails leaves no row, so its letters stay redrivable; one that succeeds
records each letter once, and the same letters again send nothing."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any, cast

import psycopg
import pytest
from aiokafka.errors import KafkaTimeoutError

from contracts import Headers, Topics
from microgrid.deadletters import DeadLetter, DlqError, Redrive, Redriver
from runtime.dlq import dlq_headers
from runtime.settings import Settings


class Producer:
    """Records what it is asked to send; acknowledges it, or fails it as a broker would."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.sent: list[tuple[str, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []

    async def send(
        self, topic: str, value: bytes | None, key: bytes | None, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[None]:
        self.sent.append((topic, value, key, headers))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.fail:
            done.set_exception(KafkaTimeoutError())
        else:
            done.set_result(None)
        return done


def letters(s: Settings, dlq: str) -> list[DeadLetter]:
    reading = {
        "device_id": "dev-r",
        "site_id": "s",
        "device_type": "meter",
        "ts": "2026-11-30T08:00:00Z",
    }
    raw, valid = s.topic(Topics.TELEMETRY_RAW), s.topic(Topics.TELEMETRY_VALID)
    return [
        DeadLetter(
            dlq,
            1,
            offset,
            0,
            b"dev-r",
            json.dumps(reading).encode(),
            tuple(dlq_headers("why", "stage", source, 0, offset)),
        )
        for offset, source in ((10, raw), (11, raw), (12, valid))
    ]


def rows(db: psycopg.Connection, dlq: str) -> list[tuple[Any, ...]]:
    return db.execute(
        "SELECT dlq_offset, target_topic, redrive_count FROM dlq_redrives WHERE dlq_topic = %s"
        " ORDER BY dlq_offset",
        (dlq,),
    ).fetchall()


async def test_a_failed_send_records_nothing_and_a_redrive_records_each_letter_once(
    stack: Settings, db: psycopg.Connection
) -> None:
    dlq = f"it-{uuid.uuid4().hex[:8]}.telemetry.dlq"
    conn = await psycopg.AsyncConnection.connect(stack.database_url, autocommit=True)
    try:

        async def chunk(producer: Producer) -> Redrive:
            result = Redrive(dry_run=False, max_redrives=1)
            redriver = Redriver(stack, conn, cast(Any, producer), result, lambda line: None)
            await redriver.chunk(letters(stack, dlq))
            return result

        failing = Producer(fail=True)
        with pytest.raises(DlqError, match="not recorded as redriven"):
            await chunk(failing)
        assert len(failing.sent) == 3
        assert rows(db, dlq) == []  # rolled back: still redrivable

        working = Producer()
        result = await chunk(working)
        assert (result.sent.total(), result.already) == (3, 0)
        raw, valid = stack.topic(Topics.TELEMETRY_RAW), stack.topic(Topics.TELEMETRY_VALID)
        assert rows(db, dlq) == [(10, raw, 1), (11, raw, 1), (12, valid, 1)]
        assert [topic for topic, *_ in working.sent] == [raw, raw, valid]
        _, value, key, headers = working.sent[2]
        assert key == b"dev-r" and json.loads(value or b"")["readings"][0]["device_id"] == "dev-r"
        assert dict(headers) == {
            Headers.REDRIVE_COUNT: b"1",
            Headers.REDRIVEN_FROM: f"{dlq}:1:12".encode(),
        }

        again = Producer()
        result = await chunk(again)
        assert (result.sent.total(), result.already, again.sent) == (0, 3, [])
    finally:
        await conn.close()
