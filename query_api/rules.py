"""Alert rules: anyone reads them, admins create, replace and delete them.

Every change is also published to the compacted `alert-rules` topic (keyed by rule id, a
tombstone for a deletion) inside the database transaction, so a rule is stored only if the
alerters will see it. At start the API republishes every stored rule.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
import psycopg
from litestar import Controller, delete, get, post, put
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from contracts.alerting import (
    OPTIONAL_FIELDS,
    AlertRuleRecord,
    AlertRuleSpec,
    RuleScope,
    rule_errors,
)
from contracts.api import AlertRule, AlertRulePage
from query_api.auth import ADMINS
from query_api.publishing import append_or_503
from query_api.services import Services
from runtime.http import problem

FIELDS = ("name", "kind", "severity", *OPTIONAL_FIELDS, "enabled")
COLUMNS = "id::text, " + ", ".join(FIELDS) + ", scope, created_at, updated_at"
INSERT_SQL = (
    f"INSERT INTO alert_rules (id, {', '.join(FIELDS)}, scope)"
    f" VALUES (%s, {', '.join(['%s'] * len(FIELDS))}, %s) RETURNING {COLUMNS}"
)
UPDATE_SQL = (
    f"UPDATE alert_rules SET {', '.join(f'{f} = %s' for f in FIELDS)}, scope = %s,"
    f" updated_at = now() WHERE id = %s RETURNING {COLUMNS}"
)


def _checked(spec: AlertRuleSpec) -> list[Any]:
    errors = rule_errors(spec)
    if errors:
        raise problem(422, "Invalid alert rule", errors[0]["message"], errors=errors)
    return [getattr(spec, f) for f in FIELDS] + [Jsonb(msgspec.to_builtins(spec.scope))]


def _rule(row: dict[str, Any]) -> AlertRule:
    row["scope"] = msgspec.convert(row["scope"], RuleScope)
    return AlertRule(**row)


def _record(rule: AlertRule) -> bytes:
    fields = {f: getattr(rule, f) for f in (*FIELDS, "scope")}
    return msgspec.json.encode(AlertRuleRecord(id=rule.id, **fields))


async def publish_rule(services: Services, rule_id: str, value: bytes | None) -> None:
    await append_or_503(services, services.rules_topic, rule_id, value, "Rules")


async def publish_all_rules(conn: psycopg.AsyncConnection, services: Services) -> int:
    cur = conn.cursor(row_factory=dict_row)
    await cur.execute(f"SELECT {COLUMNS} FROM alert_rules")
    rules = [_rule(r) for r in await cur.fetchall()]
    for rule in rules:
        await publish_rule(services, rule.id, _record(rule))
    return len(rules)


class AlertRuleController(Controller):
    path = "/api/v1/alert-rules"
    tags = ["alert rules"]

    @get()
    async def list_rules(self, services: Services) -> AlertRulePage:
        """Every rule, by name."""
        async with services.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(f"SELECT {COLUMNS} FROM alert_rules ORDER BY name, id")
            rows = await cur.fetchall()
        return AlertRulePage(items=[_rule(r) for r in rows], next_cursor=None)

    @get("/{rule_id:uuid}")
    async def get_rule(self, services: Services, rule_id: uuid.UUID) -> AlertRule:
        async with services.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(f"SELECT {COLUMNS} FROM alert_rules WHERE id = %s", (rule_id,))
            row = await cur.fetchone()
        if row is None:
            raise problem(404, "Unknown alert rule", f"no rule {rule_id}")
        return _rule(row)

    @post(guards=[ADMINS], status_code=201)
    async def create_rule(self, services: Services, data: AlertRuleSpec) -> AlertRule:
        values = _checked(data)
        async with services.pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(INSERT_SQL, [uuid.uuid4(), *values])
            row = await cur.fetchone()
            assert row is not None
            rule = _rule(row)
            await publish_rule(services, rule.id, _record(rule))
        return rule

    @put("/{rule_id:uuid}", guards=[ADMINS])
    async def replace_rule(
        self, services: Services, rule_id: uuid.UUID, data: AlertRuleSpec
    ) -> AlertRule:
        values = _checked(data)
        async with services.pool.connection() as conn, conn.transaction():
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(UPDATE_SQL, [*values, rule_id])
            row = await cur.fetchone()
            if row is None:
                raise problem(404, "Unknown alert rule", f"no rule {rule_id}")
            rule = _rule(row)
            await publish_rule(services, rule.id, _record(rule))
        return rule

    @delete("/{rule_id:uuid}", guards=[ADMINS], status_code=204)
    async def delete_rule(self, services: Services, rule_id: uuid.UUID) -> None:
        async with services.pool.connection() as conn, conn.transaction():
            cur = await conn.execute("DELETE FROM alert_rules WHERE id = %s", (rule_id,))
            if cur.rowcount == 0:
                raise problem(404, "Unknown alert rule", f"no rule {rule_id}")
            await publish_rule(services, str(rule_id), None)
