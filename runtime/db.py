"""PostgreSQL connections and ordered, recorded, idempotent migrations."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from importlib import resources

import psycopg

from runtime.settings import Settings

MIGRATION_LOCK = 0x6D6967726964  # advisory lock id: one migrator at a time


def migration_files() -> list[tuple[str, str]]:
    folder = resources.files("runtime") / "migrations"
    files = sorted((p for p in folder.iterdir() if p.name.endswith(".sql")), key=lambda p: p.name)
    return [(p.name.removesuffix(".sql"), p.read_text()) for p in files]


def migrate(s: Settings, partition_days_back: int = 8, partition_days_ahead: int = 2) -> list[str]:
    """Apply pending migrations in order; return the versions applied now."""
    applied_now: list[str] = []
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        try:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r[0] for r in conn.execute("SELECT version FROM schema_migrations")}
            for version, sql in migration_files():
                if version in done:
                    continue
                with conn.transaction():
                    conn.execute(sql.encode())
                    conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
                applied_now.append(version)
            today = datetime.now(UTC).date()
            for offset in range(-partition_days_back, partition_days_ahead + 1):
                ensure_partition(conn, today + timedelta(days=offset))
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
    return applied_now


def ensure_partition(conn: psycopg.Connection, day: date) -> None:
    conn.execute("SELECT ensure_telemetry_partition(%s)", (day,))
