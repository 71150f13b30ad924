"""Writes of the query API to Kafka, made inside the database transaction they belong to:
if the broker does not acknowledge, the request fails with 503 and the transaction rolls back."""

from __future__ import annotations

import asyncio

from aiokafka.errors import KafkaError

from query_api.services import Services
from runtime.http import problem

ACK_TIMEOUT_S = 5.0


async def append_or_503(
    services: Services, topic: str, key: str, value: bytes | None, what: str
) -> None:
    producer = services.producer.producer
    assert producer is not None, "the app's lifespan starts the producer"
    try:
        await asyncio.wait_for(
            producer.send_and_wait(topic, value, key=key.encode()), timeout=ACK_TIMEOUT_S
        )
    except (KafkaError, TimeoutError) as exc:
        await services.producer.renew_if_broken()
        raise problem(
            503,
            f"{what} log unavailable",
            "nothing was stored; retry",
            headers={"Retry-After": "2"},
        ) from exc
