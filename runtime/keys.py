"""Device ingest keys: made here for the CLI and the simulator alike, checked by the gateway.

A key belongs to one site; only its SHA-256 is stored. Keys are 256-bit random tokens, so a fast
hash is as safe as a slow one and keeps the per-request cost flat.
"""

from __future__ import annotations

import hashlib
import secrets

import psycopg

KEY_PREFIX = "mgk_"


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def create_key(conn: psycopg.Connection, site_id: str) -> str:
    """Store a new key for `site_id` and return it (the only time it is seen in clear)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    conn.execute(
        "INSERT INTO device_keys (key_prefix, key_hash, site_id) VALUES (%s, %s, %s)",
        (key[:12], hash_key(key), site_id),
    )
    return key
