"""What the query API's handlers use, made once per process and given to them by dependency
injection: the database pool, Redis, the Kafka probe, the live event stream, the outbox relay
with its producer (started on first need: the API takes requests while the broker is away, and
the relay publishes them when it returns), the users' roles and sites (`query_api.users`) and
the owner site of each device (`runtime.devices.DeviceOwners`, for the live stream's filter)
and the slots of readings exports (`query_api.export`)."""

from __future__ import annotations

import asyncio
import contextlib

from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from contracts import Topics
from query_api.users import UserDirectory
from runtime.devices import DeviceOwners
from runtime.events import EventStream
from runtime.kafka import KafkaProbe, RenewableProducer
from runtime.outbox import Relay
from runtime.settings import Settings

# Request-time Redis calls give up within seconds; the SSE stream has a client of its own whose
# reads outlast its blocking XREAD (the heartbeat).
REDIS_TIMEOUT_S = 2.0
POOL_WAIT_S = 5.0  # for a connection: while PostgreSQL is away requests fail after this
STREAM_READ_TIMEOUT_S = 30.0


class Services:
    def __init__(self, s: Settings) -> None:
        self.settings = s
        self.pool = AsyncConnectionPool(
            s.database_url,
            min_size=1,
            max_size=8,
            open=False,
            check=AsyncConnectionPool.check_connection,  # a connection a restart broke: replaced
            timeout=POOL_WAIT_S,  # then PoolTimeout: a 503 (runtime.http)
        )
        self.redis = Redis.from_url(
            s.redis_url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S
        )
        self.stream_redis = Redis.from_url(
            s.redis_url,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            socket_timeout=STREAM_READ_TIMEOUT_S,
        )
        self.kafka_probe = KafkaProbe(s)
        self.producer = RenewableProducer(s, "microgrid-api")
        self.events = EventStream(s)
        self.rules_topic = s.topic(Topics.ALERT_RULES)
        self.commands_topic = s.topic(Topics.CONTROL_COMMANDS)
        self.alerts_topic = s.topic(Topics.ALERTS)
        self.relay = Relay(s, self.producer)
        self.relay_task: asyncio.Task[None] | None = None
        self.users = UserDirectory(self.pool)
        # Readings exports streaming now: each holds a pooled connection until it ends.
        self.exports = asyncio.Semaphore(s.export_max_concurrent)
        # Only asked, never given a site: the API looks owners up and registers nothing by it.
        # Its entries are dropped when the registry changes (LISTEN on its own connection).
        self.owners = DeviceOwners(self.pool, s.database_url, "admin")

    async def start(self) -> None:
        await self.pool.open()
        await self.owners.start()
        self.relay_task = asyncio.create_task(self.relay.run())

    async def stop(self) -> None:
        if self.relay_task is not None:
            self.relay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.relay_task
        await self.owners.stop()
        await self.events.close()
        await self.producer.stop()
        await self.kafka_probe.close()
        await self.redis.aclose()
        await self.stream_redis.aclose()
        await self.pool.close()
