"""Safe defaults (issue 15): no process of the platform starts without ENVIRONMENT, and outside
dev and test the API refuses the repository's token secret and demo passwords, and creates no
demo user."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest

from runtime.kafka_access import ensure_access, remove_access
from runtime.settings import DEV_TOKEN_SECRET
from tests.conftest import Components, free_port

PRIVATE_SECRET = "a-private-token-secret-of-forty-characters!"
PRIVATE_KAFKA_PASSWORD = "a-private-kafka-password"


def test_a_production_component_refuses_the_repository_kafka_password(tmp_path: Path) -> None:
    done = run(
        [sys.executable, "-m", "microgrid.components", "validator"],
        tmp_path,
        ENVIRONMENT="production",
        KAFKA_VALIDATOR_PASSWORD=None,  # the repository's development default
    )
    assert done.returncode == 2
    assert "KAFKA_VALIDATOR_PASSWORD is the repository's development password" in done.stderr
    empty = run(
        [sys.executable, "-m", "microgrid.components", "validator"],
        tmp_path,
        ENVIRONMENT="production",
        KAFKA_VALIDATOR_PASSWORD="",
    )
    assert empty.returncode == 2
    assert "KAFKA_VALIDATOR_PASSWORD is not set" in empty.stderr


def run(args: list[str], cwd: Path, **env: str | None) -> subprocess.CompletedProcess[str]:
    merged = {**os.environ, **env}
    full = {k: v for k, v in merged.items() if v is not None}
    # cwd outside the project: no .env file can supply ENVIRONMENT
    return subprocess.run(args, cwd=cwd, env=full, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("component", ["gateway", "validator", "projector", "api"])
def test_a_component_without_environment_refuses_to_start(component: str, tmp_path: Path) -> None:
    done = run(
        [sys.executable, "-m", "microgrid.components", component], tmp_path, ENVIRONMENT=None
    )
    assert done.returncode != 0
    assert "ENVIRONMENT is not set" in done.stderr + done.stdout


def test_microgrid_run_without_environment_refuses(tmp_path: Path) -> None:
    microgrid = str(Path(sys.executable).with_name("microgrid"))
    done = run([microgrid, "run", "--only", "validator"], tmp_path, ENVIRONMENT=None)
    assert done.returncode != 0
    assert "ENVIRONMENT is not set" in done.stderr + done.stdout


def test_verbs_that_do_not_run_the_platform_need_no_environment(tmp_path: Path) -> None:
    microgrid = str(Path(sys.executable).with_name("microgrid"))
    done = run([microgrid, "contracts", "check"], Path(__file__).parents[2], ENVIRONMENT=None)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"AUTH_TOKEN_SECRET": DEV_TOKEN_SECRET}, "AUTH_TOKEN_SECRET"),
        ({"AUTH_TOKEN_SECRET": "short"}, "AUTH_TOKEN_SECRET"),
        ({"AUTH_TOKEN_SECRET": PRIVATE_SECRET}, "AUTH_ADMIN_PASSWORD"),  # demo passwords
        (
            {
                "AUTH_TOKEN_SECRET": PRIVATE_SECRET,
                "AUTH_ADMIN_PASSWORD": "",
                "AUTH_OPERATOR_PASSWORD": "",
                "AUTH_VIEWER_PASSWORD": "operator-dev-password",
            },
            "AUTH_VIEWER_PASSWORD",
        ),
    ],
)
def test_production_api_refuses_repository_secrets(
    env: dict[str, str], named: str, tmp_path: Path
) -> None:
    done = run(
        [sys.executable, "-m", "microgrid.components", "api"],
        tmp_path,
        ENVIRONMENT="production",
        API_PORT=str(free_port()),
        KAFKA_API_PASSWORD=PRIVATE_KAFKA_PASSWORD,
        **env,
    )
    assert done.returncode != 0
    assert "refusing to start" in done.stderr + done.stdout
    assert named in done.stderr + done.stdout


def test_production_api_starts_with_its_own_secrets_and_creates_no_demo_user(
    platform: Components, db: psycopg.Connection
) -> None:
    tag = uuid.uuid4().hex[:8]
    names = {role: f"prod-{role}-{tag}" for role in ("admin", "operator", "viewer")}
    port = free_port()
    # principals of its own with a private password (the session's keep the development ones)
    own = platform.s.model_copy(
        update={
            "kafka_principal_prefix": f"prod-{tag}-",
            "kafka_api_password": PRIVATE_KAFKA_PASSWORD,
        }
    )
    ensure_access(own)
    platform.start(
        "api",
        alias="api-production",
        API_PORT=str(port),
        ENVIRONMENT="production",
        KAFKA_PRINCIPAL_PREFIX=own.kafka_principal_prefix,
        KAFKA_API_PASSWORD=PRIVATE_KAFKA_PASSWORD,
        AUTH_TOKEN_SECRET=PRIVATE_SECRET,
        AUTH_ADMIN_USERNAME=names["admin"],
        AUTH_ADMIN_PASSWORD=f"own-{uuid.uuid4().hex}",
        AUTH_OPERATOR_USERNAME=names["operator"],
        AUTH_OPERATOR_PASSWORD="",
        AUTH_VIEWER_USERNAME=names["viewer"],
        AUTH_VIEWER_PASSWORD="",
    )
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
        rows = db.execute(
            "SELECT username FROM users WHERE username = ANY(%s)", (list(names.values()),)
        ).fetchall()
        assert rows == []
        # nor may the repository's demo users log in with a token this API would accept
        r = httpx.post(
            f"http://127.0.0.1:{port}/api/v1/auth/login",
            json={"username": names["admin"], "password": "admin-dev-password"},
            timeout=10,
        )
        assert r.status_code == 401
    finally:
        platform.stop("api-production")
        remove_access(own)
