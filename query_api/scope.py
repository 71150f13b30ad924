"""What a user of some sites may see: resources whose device belongs to one of their sites.

A device's site is its owner in `device_registry` (the authority; the `devices` read model only
mirrors what readings said). Every route passes the user's sites as `%(sites)s` (None: every
site, and then the condition costs nothing). A resource of another site is treated as one that
does not exist: left out of lists, 404 when asked for by id. A `site_id` filter naming a site
outside the user's scope therefore returns nothing.
"""

from __future__ import annotations

from typing import Any, Final

from psycopg import AsyncConnection


def in_scope(column: str = "device_id") -> str:
    """A WHERE condition: `column` names a device of the user's sites (`%(sites)s`)."""
    return f"(%(sites)s::text[] IS NULL OR {of_sites(column)})"


def of_sites(column: str = "device_id") -> str:
    """`in_scope` for a user of some sites only (`%(sites)s` not NULL), for a query chosen by
    whether the user is scoped: ANDed at the top of its WHERE, the planner joins the sites'
    devices in the registry to the query's rows, where `in_scope` checks each row."""
    return (
        f"{column} IN"
        " (SELECT device_id FROM device_registry WHERE site_id = ANY(%(sites)s::text[]))"
    )


OWNED_SQL: Final = "SELECT 1 FROM device_registry WHERE device_id = %s AND site_id = ANY(%s)"


async def owns(conn: AsyncConnection[Any], sites: list[str] | None, device_id: str) -> bool:
    """Whether the device belongs to one of these sites (always, for every site)."""
    if sites is None:
        return True
    cur = await conn.execute(OWNED_SQL, (device_id, sites))
    return await cur.fetchone() is not None
