"""Alert rules: anyone reads them, admins create, replace and delete them. A user scoped to
sites reads the global rules (no scope, or a device type) and those whose scope names one of
their sites or one of their sites' devices; another rule answers 404.

Every change is also queued in the outbox (`runtime.outbox`) in the same transaction, for the
compacted `alert-rules` topic (keyed by rule id, a tombstone for a deletion): a stored change
reaches every alerter, and a change rolled back never does. At start the API queues every
stored rule again, so a recreated topic is filled. What every kind has is a
column; the kind's own parameters are one jsonb column, so a new kind needs no migration.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import msgspec
import psycopg
from litestar import Controller, Request, delete, get, post, put
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from contracts.alerting import COMMON_FIELDS, AlertRuleSpec
from contracts.api import AlertRulePage
from query_api.auth import ADMINS
from query_api.publishing import published
from query_api.scope import in_scope
from query_api.services import Services
from runtime import outbox
from runtime.http import problem
from runtime.openapi import problems

log = logging.getLogger("microgrid.api")

COLUMNS = "id::text, name, kind, severity, scope, enabled, params, created_at, updated_at"
INSERT_SQL = (
    "INSERT INTO alert_rules (id, name, kind, severity, scope, enabled, params)"
    f" VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING {COLUMNS}"
)
# A rule a user of these sites may read: global, or scoped to one of them or to their device.
VISIBLE = f"""(%(sites)s::text[] IS NULL
  OR (scope->>'site_id' IS NULL AND scope->>'device_id' IS NULL)
  OR scope->>'site_id' = ANY(%(sites)s::text[])
  OR (scope->>'device_id' IS NOT NULL AND {in_scope("scope->>'device_id'")}))"""
UPDATE_SQL = (
    "UPDATE alert_rules SET name = %s, kind = %s, severity = %s, scope = %s, enabled = %s,"
    f" params = %s, updated_at = now() WHERE id = %s RETURNING {COLUMNS}"
)


def _checked(spec: AlertRuleSpec) -> list[Any]:
    """The columns of a sound rule; a problem naming the field otherwise."""
    errors = spec.problems()
    if errors:
        raise problem(422, "Invalid alert rule", errors[0]["message"], errors=errors)
    fields = msgspec.to_builtins(spec)
    params = {k: v for k, v in fields.items() if k not in COMMON_FIELDS and k != "kind"}
    return [
        spec.name,
        fields["kind"],
        spec.severity,
        Jsonb(msgspec.to_builtins(spec.scope)),
        spec.enabled,
        Jsonb(params),
    ]


def _rule(row: dict[str, Any]) -> AlertRuleSpec:
    params = row.pop("params")
    rule: AlertRuleSpec = msgspec.convert({**params, **row}, AlertRuleSpec)
    return rule


def _record(rule: AlertRuleSpec) -> bytes:
    """The rule as the alerters read it: with its id, without the API's timestamps."""
    return msgspec.json.encode(msgspec.structs.replace(rule, created_at=None, updated_at=None))


async def publish_rule(
    conn: psycopg.AsyncConnection, services: Services, rule_id: str, value: bytes | None
) -> int:
    return await outbox.add(conn, services.rules_topic, rule_id, value)


async def publish_all_rules(conn: psycopg.AsyncConnection, services: Services) -> int:
    """Queue every rule again (inside the caller's transaction). The rows are locked until it
    commits, so a concurrent change or deletion queues its record after these, never before."""
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(f"SELECT {COLUMNS} FROM alert_rules ORDER BY id FOR SHARE")
    published = 0
    for row in await cur.fetchall():
        rule_id = row["id"]
        try:
            rule = _rule(row)
        except msgspec.ValidationError as exc:  # written around the API: say so, start anyway
            log.error("alert rule %s is not a valid rule and was not published: %s", rule_id, exc)
            continue
        await publish_rule(conn, services, rule_id, _record(rule))
        published += 1
    return published


class AlertRuleController(Controller):
    path = "/api/v1/alert-rules"
    tags = ["alert rules"]

    @get()
    async def list_rules(
        self, services: Services, request: Request[Any, Any, Any]
    ) -> AlertRulePage:
        """Every rule the user may read (all, unless scoped to sites), by name."""
        async with services.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                f"SELECT {COLUMNS} FROM alert_rules WHERE {VISIBLE} ORDER BY name, id",
                {"sites": request.user.scope},
            )
            rows = await cur.fetchall()
        return AlertRulePage(items=[_rule(r) for r in rows], next_cursor=None)

    @get("/{rule_id:uuid}", opt=problems(404))
    async def get_rule(
        self, services: Services, request: Request[Any, Any, Any], rule_id: uuid.UUID
    ) -> AlertRuleSpec:
        async with services.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                f"SELECT {COLUMNS} FROM alert_rules WHERE id = %(id)s AND {VISIBLE}",
                {"id": rule_id, "sites": request.user.scope},
            )
            row = await cur.fetchone()
        if row is None:
            raise problem(404, "Unknown alert rule", f"no rule {rule_id}")
        return _rule(row)

    @post(guards=[ADMINS], status_code=201)
    async def create_rule(self, services: Services, data: AlertRuleSpec) -> AlertRuleSpec:
        """A new rule of one of the kinds, each with its own fields (`kind` says which)."""
        values = _checked(data)
        async with services.pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(INSERT_SQL, [uuid.uuid4(), *values])
            row = await cur.fetchone()
            assert row is not None
            rule = _rule(row)
            queued = await publish_rule(conn, services, row["id"], _record(rule))
        await published(services, queued)
        return rule

    @put("/{rule_id:uuid}", guards=[ADMINS], opt=problems(404))
    async def replace_rule(
        self, services: Services, rule_id: uuid.UUID, data: AlertRuleSpec
    ) -> AlertRuleSpec:
        values = _checked(data)
        async with services.pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(UPDATE_SQL, [*values, rule_id])
            row = await cur.fetchone()
            if row is None:
                raise problem(404, "Unknown alert rule", f"no rule {rule_id}")
            rule = _rule(row)
            queued = await publish_rule(conn, services, row["id"], _record(rule))
        await published(services, queued)
        return rule

    @delete("/{rule_id:uuid}", guards=[ADMINS], status_code=204, opt=problems(404))
    async def delete_rule(self, services: Services, rule_id: uuid.UUID) -> None:
        async with services.pool.connection() as conn, conn.transaction():
            cur = await conn.execute("DELETE FROM alert_rules WHERE id = %s", (rule_id,))
            if cur.rowcount == 0:
                raise problem(404, "Unknown alert rule", f"no rule {rule_id}")
            queued = await publish_rule(conn, services, str(rule_id), None)
        await published(services, queued)
