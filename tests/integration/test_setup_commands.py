"""Stack, migrations and device keys, as a user runs them from the command line."""

from __future__ import annotations

import os
import subprocess
import sys

import psycopg

from runtime.db import migrate
from runtime.keys import hash_key
from runtime.settings import PROJECT_ROOT, Settings


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "microgrid.cli", *args],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        env=os.environ.copy(),
        timeout=120,
    )


def test_stack_up_is_idempotent_and_status_names_the_ports(stack: Settings) -> None:
    again = cli("stack", "up")
    assert again.returncode == 0, again.stderr
    status = cli("stack", "status")
    assert status.returncode == 0
    for name, port in (("postgres", 5432), ("redis", 6379), ("kafka", stack.kafka_port)):
        line = next(ln for ln in status.stdout.splitlines() if ln.startswith(name))
        assert "up" in line and f":{port}" in line


def test_migrate_twice_applies_nothing_the_second_time(
    stack: Settings, db: psycopg.Connection
) -> None:
    assert migrate(stack) == []
    out = cli("migrate")
    assert out.returncode == 0 and "up to date" in out.stdout
    versions = [r[0] for r in db.execute("SELECT version FROM schema_migrations ORDER BY 1")]
    assert versions == sorted(set(versions)) and versions[0] == "001_foundation"


def test_keys_create_prints_only_the_key_and_stores_its_hash(
    stack: Settings, db: psycopg.Connection
) -> None:
    out = cli("keys", "create", "--site", "site-cli")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mgk_")
    key = lines[0]
    row = db.execute(
        "SELECT site_id, key_hash FROM device_keys WHERE key_prefix = %s", (key[:12],)
    ).fetchone()
    assert row is not None
    assert row[0] == "site-cli" and bytes(row[1]) == hash_key(key)
    stored_text = db.execute("SELECT count(*) FROM device_keys WHERE key_prefix = %s", (key,))
    assert stored_text.fetchone() == (0,)


def test_keys_create_refuses_a_bad_site_id(stack: Settings) -> None:
    out = cli("keys", "create", "--site", "no spaces please")
    assert out.returncode != 0
    assert "invalid site id" in out.stderr and out.stdout == ""


def test_api_refuses_the_dev_token_secret_outside_dev(stack: Settings) -> None:
    env = {
        **os.environ,
        "ENVIRONMENT": "prod",
        "API_PORT": "1",
        "KAFKA_API_PASSWORD": "own-password",
    }
    env.pop("AUTH_TOKEN_SECRET", None)
    out = subprocess.run(
        [sys.executable, "-m", "microgrid.components", "api"],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        env=env,
        timeout=60,
    )
    assert out.returncode == 2
    assert "AUTH_TOKEN_SECRET must be set" in out.stderr
    assert "Traceback" not in out.stderr
