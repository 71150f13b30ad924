"""Query API (port 8080): read models, operator actions, operations endpoints, dashboard."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
from litestar import Litestar
from litestar.di import Provide
from litestar.static_files import create_static_files_router

from query_api.alerts import AlertController, NotificationController
from query_api.auth import LoginThrottle, TokenIssuer, ensure_demo_users, jwt_auth, login
from query_api.control import ControlCommandController, get_catalogue
from query_api.devices import DeviceController
from query_api.export import export_readings
from query_api.ops import readyz
from query_api.overview import get_overview
from query_api.registry import RegistryController
from query_api.rules import AlertRuleController, publish_all_rules
from query_api.services import Services
from query_api.stream import stream
from runtime.http import (
    MetricsController,
    before_request,
    cors_config,
    exception_handlers,
    healthz,
    openapi_config,
    problem_details_plugin,
    prometheus_config,
)
from runtime.openapi import StructSchemas, document_routes
from runtime.settings import Settings, get_settings
from ui import STATIC_DIR


def _seed_users(s: Settings) -> None:
    if not s.is_dev:  # demo users exist in dev and test only
        return
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        ensure_demo_users(conn, s)


def create_app(settings: Settings | None = None) -> Litestar:
    s = settings or get_settings()
    services = Services(s)
    auth = jwt_auth(s, services.users)
    tokens = TokenIssuer(auth)
    throttle = LoginThrottle(
        services.redis,
        s.login_max_failures,
        s.login_lockout_s,
        s.login_max_verifications,
        prefix=s.topic(""),
    )

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        await asyncio.to_thread(_seed_users, s)
        await services.start()
        async with services.pool.connection() as conn, conn.transaction():
            await publish_all_rules(conn, services)
        try:
            yield
        finally:
            await services.stop()

    prometheus = prometheus_config("query_api")
    app = Litestar(
        logging_config=None,  # the process's logging (runtime.logs), not Litestar's own
        route_handlers=[
            login,
            DeviceController,
            export_readings,
            AlertController,
            NotificationController,
            ControlCommandController,
            get_catalogue,
            get_overview,
            AlertRuleController,
            RegistryController,
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
        dependencies={
            "services": Provide(lambda: services, use_cache=True, sync_to_thread=False),
            "throttle": Provide(lambda: throttle, use_cache=True, sync_to_thread=False),
            "tokens": Provide(lambda: tokens, use_cache=True, sync_to_thread=False),
        },
        lifespan=[lifespan],
        on_app_init=[auth.on_app_init],
        middleware=[prometheus.middleware],
        plugins=[problem_details_plugin(), StructSchemas()],
        before_request=before_request,
        exception_handlers=exception_handlers,  # type: ignore[arg-type]
        cors_config=cors_config(s.public_origin),
        openapi_config=openapi_config(
            "Microgrid query API",
            "Devices, readings (and their export as files), alerts, notifications, control"
            " commands, alert rules and the device registry. "
            "Log in with POST /api/v1/auth/login and send `Authorization: Bearer <token>`.",
        ),
    )
    document_routes(app)
    return app
