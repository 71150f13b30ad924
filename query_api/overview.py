"""The operator dashboard's overview: how many devices are online, offline and alerting, the
open alerts by severity, the unread notifications, and the same device counts per site.

Everything counts only the user's sites' devices (`query_api.scope`), and what the optional
`site_id` and `device_type` filters leave. Online and alerting mean what they mean in the
device list (`query_api.devices.ONLINE`, `ALERTING`); an open alert is one in any status but
cleared. At most `MAX_SITES` sites, in id order (`sites_truncated` says there were more); the
totals count every site.

Each query comes in two forms, for users of every site and for users of some sites
(`query_api.scope.of_sites`), so a scoped user's counts start from their sites' devices rather
than checking every row against them; the open alerts, the active ones and the unread
notifications each have a partial index (migration 011)."""

from __future__ import annotations

from typing import Annotated, Any, Final

from litestar import Request, get
from litestar.params import Parameter
from psycopg.rows import dict_row

from contracts.alerting import SEVERITIES
from contracts.api import AlertCounts, DeviceCounts, Overview, SiteSummary
from contracts.readings import DeviceType
from query_api.devices import ALERTING, ONLINE
from query_api.scope import of_sites
from query_api.services import Services

MAX_SITES: Final = 1000

# One row for every device (GROUPING 1: the totals), then one per site in id order.
DEVICES_SQL = f"""
SELECT d.site_id, GROUPING(d.site_id) = 1 AS total, count(*) AS devices,
       count(*) FILTER (WHERE {ONLINE}) AS online,
       count(*) FILTER (WHERE {ALERTING}) AS alerting
FROM devices d
WHERE {{scope}}
  AND (%(site_id)s::text IS NULL OR d.site_id = %(site_id)s)
  AND (%(device_type)s::text IS NULL OR d.device_type = %(device_type)s)
GROUP BY GROUPING SETS ((), (d.site_id))
ORDER BY GROUPING(d.site_id) DESC, d.site_id
LIMIT %(limit)s
"""
# Open alerts: `status <> 'cleared'` is the predicate of the open alerts' index.
ALERTS_SQL = """
SELECT severity, count(*) AS n
FROM alerts
WHERE status <> 'cleared' AND {scope}
  AND (%(site_id)s::text IS NULL OR site_id = %(site_id)s)
  AND (%(device_type)s::text IS NULL
       OR device_id IN (SELECT device_id FROM devices WHERE device_type = %(device_type)s))
GROUP BY severity
"""
UNREAD_SQL = """
SELECT count(*) AS n
FROM notifications
WHERE acked_at IS NULL AND {scope}
  AND (%(site_id)s::text IS NULL OR site_id = %(site_id)s)
  AND (%(device_type)s::text IS NULL
       OR device_id IN (SELECT device_id FROM devices WHERE device_type = %(device_type)s))
"""
# (devices, alerts, unread) by whether the user is scoped to sites
QUERIES: Final = {
    scoped: (
        DEVICES_SQL.format(scope=of_sites("d.device_id") if scoped else "true"),
        ALERTS_SQL.format(scope=of_sites() if scoped else "true"),
        UNREAD_SQL.format(scope=of_sites() if scoped else "true"),
    )
    for scoped in (False, True)
}


@get("/api/v1/overview", tags=["overview"])
async def get_overview(
    services: Services,
    request: Request[Any, Any, Any],
    site_id: str | None = None,
    device_type: Annotated[DeviceType | None, Parameter(description="only this type")] = None,
) -> Overview:
    """Device counts (online, offline, alerting), open alerts by severity (every status but
    cleared) and unread notifications, of the user's sites; and the device counts of each site,
    in id order, at most 1,000 sites (`sites_truncated`: there were more; the totals count
    every site)."""
    params = {
        "sites": request.user.scope,
        "site_id": site_id,
        "device_type": device_type,
        "offline_after": services.settings.device_offline_after_s,
        "limit": 1 + MAX_SITES + 1,
    }
    devices_sql, alerts_sql, unread_sql = QUERIES[params["sites"] is not None]
    async with services.pool.connection() as conn:
        cur = conn.cursor(row_factory=dict_row)
        await cur.execute(devices_sql, params)
        rows = await cur.fetchall()
        await cur.execute(alerts_sql, params)
        by_severity = {r["severity"]: int(r["n"]) for r in await cur.fetchall()}
        await cur.execute(unread_sql, params)
        unread = await cur.fetchone()
    totals: dict[str, Any] = {"devices": 0, "online": 0, "alerting": 0}
    if rows and rows[0]["total"]:
        totals = rows.pop(0)
    return Overview(
        devices=DeviceCounts(
            total=totals["devices"],
            online=totals["online"],
            offline=totals["devices"] - totals["online"],
            alerting=totals["alerting"],
        ),
        alerts=AlertCounts(**{s: by_severity.get(s, 0) for s in SEVERITIES}),
        unread_notifications=int(unread["n"]) if unread else 0,
        sites=[
            SiteSummary(
                site_id=r["site_id"],
                devices=r["devices"],
                online=r["online"],
                alerting=r["alerting"],
            )
            for r in rows[:MAX_SITES]
        ],
        sites_truncated=len(rows) > MAX_SITES,
        offline_after_s=services.settings.device_offline_after_s,
    )
