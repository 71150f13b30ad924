"""Query API (port 8080): read models, operator actions, operations endpoints, dashboard."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
from litestar import Litestar
from litestar.static_files import create_static_files_router
from psycopg_pool import AsyncConnectionPool
from redis.asyncio import Redis

from contracts import Topics
from microgrid.events import EventStream
from microgrid.http import (
    MetricsController,
    cors_config,
    exception_handlers,
    healthz,
    openapi_config,
    problem_details_plugin,
    prometheus_config,
)
from microgrid.kafka import KafkaProbe, RenewableProducer
from microgrid.settings import Settings, get_settings
from query_api.alerts import AlertController, NotificationController
from query_api.auth import LoginThrottle, ensure_demo_users, jwt_auth, login
from query_api.control import ControlCommandController
from query_api.devices import DeviceController
from query_api.ops import readyz
from query_api.rules import AlertRuleController, publish_all_rules
from query_api.stream import stream
from ui import STATIC_DIR


def _seed_users(s: Settings) -> None:
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        ensure_demo_users(conn, s)


def create_app(settings: Settings | None = None) -> Litestar:
    s = settings or get_settings()
    auth = jwt_auth(s)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await asyncio.to_thread(_seed_users, s)
        pool = AsyncConnectionPool(s.database_url, min_size=1, max_size=8, open=False)
        await pool.open()
        redis = Redis.from_url(s.redis_url)
        probe = KafkaProbe(s)
        producer = RenewableProducer(s, "microgrid-api")
        await producer.start()
        events = EventStream(s)
        app.state.update(
            settings=s,
            pool=pool,
            redis=redis,
            kafka_probe=probe,
            jwt_auth=auth,
            login_throttle=LoginThrottle(redis, s.login_max_failures, s.login_lockout_s),
            producer=producer,
            events=events,
            rules_topic=s.topic(Topics.ALERT_RULES),
            commands_topic=s.topic(Topics.CONTROL_COMMANDS),
        )
        async with pool.connection() as conn:
            await publish_all_rules(conn, app.state)
        try:
            yield
        finally:
            await events.close()
            await producer.stop()
            await probe.close()
            await redis.aclose()
            await pool.close()

    prometheus = prometheus_config("query_api")
    return Litestar(
        logging_config=None,  # the process's logging (microgrid.logs), not Litestar's own
        route_handlers=[
            login,
            DeviceController,
            AlertController,
            NotificationController,
            ControlCommandController,
            AlertRuleController,
            healthz,
            readyz,
            stream,
            MetricsController,
            create_static_files_router(
                path="/",
                directories=[STATIC_DIR],
                html_mode=True,
                opt={"public": True},
                include_in_schema=False,
            ),
        ],
        lifespan=[lifespan],
        on_app_init=[auth.on_app_init],
        middleware=[prometheus.middleware],
        plugins=[problem_details_plugin()],
        exception_handlers=exception_handlers,  # type: ignore[arg-type]
        cors_config=cors_config(s.public_origin),
        openapi_config=openapi_config(
            "Microgrid query API",
            "Devices, readings, alerts, notifications, control commands and alert rules. "
            "Log in with POST /api/v1/auth/login and send `Authorization: Bearer <token>`.",
        ),
    )
