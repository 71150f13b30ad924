"""Alert rules: anyone reads them, admins create, replace and delete them."""

from __future__ import annotations

import uuid
from typing import Any

import msgspec
from litestar import Controller, delete, get, post, put
from litestar.datastructures import State
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from contracts.alerting import OPTIONAL_FIELDS, AlertRuleSpec, RuleScope, rule_errors
from contracts.api import AlertRule, AlertRulePage
from microgrid.http import problem
from query_api.auth import ADMINS

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


class AlertRuleController(Controller):
    path = "/api/v1/alert-rules"
    tags = ["alert rules"]

    @get()
    async def list_rules(self, state: State) -> AlertRulePage:
        """Every rule, by name."""
        async with state.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(f"SELECT {COLUMNS} FROM alert_rules ORDER BY name, id")
            rows = await cur.fetchall()
        return AlertRulePage(items=[_rule(r) for r in rows], next_cursor=None)

    @get("/{rule_id:uuid}")
    async def get_rule(self, state: State, rule_id: uuid.UUID) -> AlertRule:
        async with state.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(f"SELECT {COLUMNS} FROM alert_rules WHERE id = %s", (rule_id,))
            row = await cur.fetchone()
        if row is None:
            raise problem(404, "Unknown alert rule", f"no rule {rule_id}")
        return _rule(row)

    @post(guards=[ADMINS], status_code=201)
    async def create_rule(self, state: State, data: AlertRuleSpec) -> AlertRule:
        values = _checked(data)
        async with state.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(INSERT_SQL, [uuid.uuid4(), *values])
            row = await cur.fetchone()
        assert row is not None
        return _rule(row)

    @put("/{rule_id:uuid}", guards=[ADMINS])
    async def replace_rule(
        self, state: State, rule_id: uuid.UUID, data: AlertRuleSpec
    ) -> AlertRule:
        values = _checked(data)
        async with state.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(UPDATE_SQL, [*values, rule_id])
            row = await cur.fetchone()
        if row is None:
            raise problem(404, "Unknown alert rule", f"no rule {rule_id}")
        return _rule(row)

    @delete("/{rule_id:uuid}", guards=[ADMINS], status_code=204)
    async def delete_rule(self, state: State, rule_id: uuid.UUID) -> None:
        async with state.pool.connection() as conn:
            cur = await conn.execute("DELETE FROM alert_rules WHERE id = %s", (rule_id,))
        if cur.rowcount == 0:
            raise problem(404, "Unknown alert rule", f"no rule {rule_id}")
