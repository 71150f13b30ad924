"""Device ingest keys: made and managed here for the CLI and the simulator alike, checked by the
gateway (`ingest_gateway.keys`); and the record of sites' Kafka principals, whose credentials
and ACLs the broker holds (`runtime.kafka_access`).

A key belongs to one site; only its SHA-256 is stored, with its first 12 characters
(`key_prefix`) to name it. Keys are 256-bit random tokens, so a fast hash is as safe as a slow
one and keeps the per-request cost flat. A key is active while `revoked_at` is unset or in the
future (a rotation's grace period).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import psycopg

KEY_PREFIX = "mgk_"
PREFIX_CHARS = 12
ACTIVE_SQL = "(revoked_at IS NULL OR revoked_at > now())"


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def create_key(conn: psycopg.Connection, site_id: str) -> str:
    """Store a new key for `site_id` and return it (the only time it is seen in clear)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    conn.execute(
        "INSERT INTO device_keys (key_prefix, key_hash, site_id) VALUES (%s, %s, %s)",
        (key[:PREFIX_CHARS], hash_key(key), site_id),
    )
    return key


@dataclass(frozen=True)
class KeyInfo:
    """What is stored about a key, never the key or its hash."""

    id: int
    prefix: str
    site: str
    created_at: datetime
    revoked_at: datetime | None
    active: bool

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "prefix": self.prefix,
            "site": self.site,
            "created_at": self.created_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "active": self.active,
        }


class KeyNotFound(LookupError):
    """No key, or more than one, matches what was given."""


_COLUMNS = f"id, key_prefix, site_id, created_at, revoked_at, {ACTIVE_SQL}"


def list_keys(conn: psycopg.Connection, site_id: str | None = None) -> list[KeyInfo]:
    sql = f"SELECT {_COLUMNS} FROM device_keys"
    if site_id is None:
        rows = conn.execute(sql + " ORDER BY id").fetchall()
    else:
        rows = conn.execute(sql + " WHERE site_id = %s ORDER BY id", (site_id,)).fetchall()
    return [KeyInfo(*row) for row in rows]


def find_key(conn: psycopg.Connection, ref: str) -> KeyInfo:
    """The one key that `ref` names: its id, the start of its prefix (`mgk_...`), or the whole
    key. KeyNotFound when none or several match."""
    ref = ref.strip()
    arg: int | str | bytes
    if ref.isdigit():
        where, arg = "id = %s", int(ref)
    elif len(ref) > PREFIX_CHARS:
        where, arg = "key_hash = %s", hash_key(ref)
    elif ref:
        where, arg = "starts_with(key_prefix, %s)", ref
    else:
        raise KeyNotFound("give a key id, a key prefix or the key itself")
    rows = conn.execute(f"SELECT {_COLUMNS} FROM device_keys WHERE {where} ORDER BY id", (arg,))
    found = [KeyInfo(*row) for row in rows.fetchall()]
    if not found:
        raise KeyNotFound(f"no key matches {ref!r}")
    if len(found) > 1:
        ids = ", ".join(f"{k.id} ({k.prefix}, {k.site})" for k in found[:10])
        raise KeyNotFound(f"{ref!r} matches {len(found)} keys: {ids}; give the id")
    return found[0]


def revoke_key(conn: psycopg.Connection, ref: str, after: timedelta | None = None) -> KeyInfo:
    """Revoke the key `ref` names, now or `after` from now (never later than it already is);
    KeyNotFound when it names none, several or an already revoked key."""
    with conn.transaction():
        key = find_key(conn, ref)
        row = conn.execute(
            "UPDATE device_keys SET revoked_at = now() + %s"
            f" WHERE id = %s AND {ACTIVE_SQL} AND (revoked_at IS NULL OR revoked_at > now() + %s)"
            f" RETURNING {_COLUMNS}",
            (after or timedelta(0), key.id, after or timedelta(0)),
        ).fetchone()
        if row is None:
            if not key.active:
                raise KeyNotFound(f"key {key.id} ({key.prefix}) was revoked at {key.revoked_at}")
            return key  # already revoked sooner than asked
        return KeyInfo(*row)


def rotate_key(
    conn: psycopg.Connection, ref: str, grace: timedelta | None = None
) -> tuple[str, KeyInfo, KeyInfo]:
    """A new key for the site of the active key `ref` names, and that old key revoked now or
    after `grace`, in one transaction: (new key, new key's info, old key's info)."""
    with conn.transaction():
        old = find_key(conn, ref)
        if not old.active:
            raise KeyNotFound(f"key {old.id} ({old.prefix}) was revoked at {old.revoked_at}")
        new = create_key(conn, old.site)
        old = revoke_key(conn, str(old.id), grace)
        return new, find_key(conn, new), old


@dataclass(frozen=True)
class KafkaPrincipal:
    """A site's Kafka principal as stored here: its name, never its password."""

    id: int
    username: str
    site: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def as_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "username": self.username,
            "site": self.site,
            "created_at": self.created_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "active": self.active,
        }


_PRINCIPAL_COLUMNS = "id, username, site_id, created_at, revoked_at"


def record_kafka_principal(conn: psycopg.Connection, username: str, site_id: str) -> None:
    conn.execute(
        "INSERT INTO kafka_principals (username, site_id) VALUES (%s, %s)", (username, site_id)
    )


def list_kafka_principals(
    conn: psycopg.Connection, site_id: str | None = None
) -> list[KafkaPrincipal]:
    sql = f"SELECT {_PRINCIPAL_COLUMNS} FROM kafka_principals"
    if site_id is None:
        rows = conn.execute(sql + " ORDER BY id").fetchall()
    else:
        rows = conn.execute(sql + " WHERE site_id = %s ORDER BY id", (site_id,)).fetchall()
    return [KafkaPrincipal(*row) for row in rows]


def find_kafka_principal(conn: psycopg.Connection, username: str) -> KafkaPrincipal | None:
    row = conn.execute(
        f"SELECT {_PRINCIPAL_COLUMNS} FROM kafka_principals WHERE username = %s", (username,)
    ).fetchone()
    return None if row is None else KafkaPrincipal(*row)


def mark_kafka_principal_revoked(conn: psycopg.Connection, username: str) -> KafkaPrincipal:
    row = conn.execute(
        "UPDATE kafka_principals SET revoked_at = coalesce(revoked_at, now())"
        f" WHERE username = %s RETURNING {_PRINCIPAL_COLUMNS}",
        (username,),
    ).fetchone()
    if row is None:
        raise KeyNotFound(f"no Kafka principal {username!r}")
    return KafkaPrincipal(*row)
