"""What the query API's handlers use, made once per process and given to them by dependency
injection: the database pool, Redis, the Kafka producer and probe, the live event stream."""

from __future__ import annotations

from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from contracts import Topics
from runtime.events import EventStream
from runtime.kafka import KafkaProbe, RenewableProducer
from runtime.settings import Settings


class Services:
    def __init__(self, s: Settings) -> None:
        self.settings = s
        self.pool = AsyncConnectionPool(s.database_url, min_size=1, max_size=8, open=False)
        self.redis = Redis.from_url(s.redis_url)
        self.kafka_probe = KafkaProbe(s)
        self.producer = RenewableProducer(s, "microgrid-api")
        self.events = EventStream(s)
        self.rules_topic = s.topic(Topics.ALERT_RULES)
        self.commands_topic = s.topic(Topics.CONTROL_COMMANDS)

    async def start(self) -> None:
        await self.pool.open()
        await self.producer.start()

    async def stop(self) -> None:
        await self.events.close()
        await self.producer.stop()
        await self.kafka_probe.close()
        await self.redis.aclose()
        await self.pool.close()
