"""Session fixtures: the real local stack (Kafka, PostgreSQL, Redis), an isolated database and
topic namespace per session, and the platform's components as real processes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest

from runtime.db import migrate
from runtime.kafka import delete_topics, ensure_topics, topic_specs
from runtime.kafka_access import ensure_access, remove_access
from runtime.keys import create_key
from runtime.settings import PROJECT_ROOT, Settings
from tests.support import drop_database

RUN_ID = uuid.uuid4().hex[:8]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Tests that stop the broker run last, so they cannot disturb the others.
    items.sort(key=lambda item: item.get_closest_marker("broker_outage") is not None)


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    return Settings()


@pytest.fixture(scope="session")
def stack(base_settings: Settings) -> Iterator[Settings]:
    """Start the local stack (idempotent) and make an isolated database and topic namespace."""
    subprocess.run(
        [sys.executable, "-m", "microgrid.cli", "stack", "up"], check=True, cwd=PROJECT_ROOT
    )
    url = urlsplit(base_settings.database_url)
    test_db = f"microgrid_test_{RUN_ID}"
    with psycopg.connect(base_settings.database_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{test_db}"')
    env = {
        "DATABASE_URL": urlunsplit(url._replace(path=f"/{test_db}")),
        "KAFKA_NAMESPACE": f"test-{RUN_ID}.",
        "GATEWAY_PORT": str(free_port()),
        "API_PORT": str(free_port()),
        "VALIDATOR_METRICS_PORT": str(free_port()),
        "PROJECTOR_METRICS_PORT": str(free_port()),
        "ALERTER_METRICS_PORT": str(free_port()),
        "CONTROLLER_METRICS_PORT": str(free_port()),
        "ENVIRONMENT": "test",
        "DEVICE_TOPIC_PARTITIONS": "4",
    }
    os.environ.update(env)
    s = Settings()
    migrate(s)
    asyncio.run(ensure_topics(s))
    ensure_access(s)
    yield s
    asyncio.run(delete_topics(s, [t.name for t in topic_specs(s)]))
    remove_access(s)
    with psycopg.connect(base_settings.database_url, autocommit=True) as conn:
        drop_database(conn, test_db)


class Components:
    """The platform's components as real processes, so tests can kill and restart them."""

    def __init__(self, settings: Settings, log_dir: Path) -> None:
        self.s = settings
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, alias: str | None = None, **env: str) -> None:
        log_path = self.log_dir / f"{alias or name}.log"
        seen = (
            log_path.read_text(errors="replace").count("restored state") if log_path.exists() else 0
        )
        log = log_path.open("ab")
        self.procs[alias or name] = subprocess.Popen(
            [sys.executable, "-m", "microgrid.components", name],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=PROJECT_ROOT,
            env={**os.environ, **env},
        )
        if name in ("gateway", "api"):
            port = env.get("GATEWAY_PORT" if name == "gateway" else "API_PORT")
            default = self.s.gateway_port if name == "gateway" else self.s.api_port
            url = f"http://127.0.0.1:{port or default}"
            # 90 s: on a busy machine a worker's imports alone took 25 s
            wait_for(lambda: self.healthy(url), 90, f"{name} /healthz")
        if name == "alerter":  # a new group starts at the log's end: wait until it has joined
            wait_for(
                lambda: log_path.read_text(errors="replace").count("restored state") > seen,
                60,
                "alerter to join its group",
            )

    @staticmethod
    def healthy(url: str) -> bool:
        try:
            return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.s.gateway_port}"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.s.api_port}"

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()


@pytest.fixture(scope="session")
def platform(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Components]:
    components = Components(stack, tmp_path_factory.mktemp("logs"))
    for name in ("validator", "projector", "gateway", "api", "alerter", "controller"):
        components.start(name)
    yield components
    components.stop_all()


@pytest.fixture(scope="session")
def tokens(platform: Components) -> dict[str, str]:
    """A bearer token for each demo user, by role (admin, operator, viewer)."""
    s = platform.s
    users = {
        "admin": (s.auth_admin_username, s.auth_admin_password),
        "operator": (s.auth_operator_username, s.auth_operator_password),
        "viewer": (s.auth_viewer_username, s.auth_viewer_password),
    }
    out = {}
    for role, (username, password) in users.items():
        r = httpx.post(
            f"{platform.api_url}/api/v1/auth/login",
            json={"username": username, "password": password},
            timeout=10,
        )
        assert r.status_code == 200, r.text
        out[role] = r.json()["access_token"]
    return out


@pytest.fixture()
def db(stack: Settings) -> Iterator[psycopg.Connection]:
    with psycopg.connect(stack.database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture()
def site() -> str:
    return f"site-{uuid.uuid4().hex[:8]}"


@pytest.fixture()
def device_key(db: psycopg.Connection, site: str) -> str:
    return create_key(db, site)
