"""Stored consumer positions of projections (`projection_offsets`)."""

from __future__ import annotations

import psycopg


class Position:
    """Where a projection stands in one partition, as stored in `projection_offsets`."""

    __slots__ = ("next_offset",)

    def __init__(self, next_offset: int) -> None:
        self.next_offset = next_offset  # -1: nothing projected yet


async def load_positions(
    conn: psycopg.AsyncConnection, projection: str, topic: str, partitions: list[int]
) -> dict[int, Position]:
    await conn.execute(
        "INSERT INTO projection_offsets (projection, topic, partition, next_offset)"
        " SELECT %s, %s, p, -1 FROM unnest(%s::int[]) AS p ON CONFLICT DO NOTHING",
        (projection, topic, partitions),
    )
    cur = await conn.execute(
        "SELECT partition, next_offset FROM projection_offsets"
        " WHERE projection = %s AND topic = %s AND partition = ANY(%s)",
        (projection, topic, partitions),
    )
    return {p: Position(o) for p, o in await cur.fetchall()}


async def save_position(
    conn: psycopg.AsyncConnection,
    projection: str,
    topic: str,
    partition: int,
    expected: int,
    new: Position,
) -> bool:
    """Move the stored position; False when another consumer moved it first (fencing)."""
    cur = await conn.execute(
        "UPDATE projection_offsets SET next_offset = %s, updated_at = now()"
        " WHERE projection = %s AND topic = %s AND partition = %s AND next_offset = %s",
        (new.next_offset, projection, topic, partition, expected),
    )
    return cur.rowcount == 1
