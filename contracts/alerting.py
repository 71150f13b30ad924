"""Alert rules: the shape admins send and the checks every kind needs. Shared by the query API
(which stores rules) and the alerter (which evaluates them)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Final, Literal

import msgspec
from msgspec import Meta

from contracts.readings import METRICS, DeviceType

RuleKind = Literal["threshold", "rate_of_change", "offline"]
Op = Literal["gt", "lt", "outside"]
Severity = Literal["critical", "major", "minor", "warning"]
SEVERITIES: Final = ("critical", "major", "minor", "warning")
Seconds = Annotated[float, Meta(ge=0, le=7 * 24 * 3600)]
RuleName = Annotated[str, Meta(min_length=1, max_length=200)]
ScopeValue = Annotated[str, Meta(min_length=1, max_length=64)]

# Which optional fields each kind takes; anything else is refused.
KIND_FIELDS: Final[dict[str, frozenset[str]]] = {
    "threshold": frozenset(
        {"metric", "op", "threshold", "low", "high", "clear_threshold", "for_s"}
    ),
    "rate_of_change": frozenset({"metric", "op", "threshold", "window_s", "for_s"}),
    "offline": frozenset({"silent_s"}),
}
OPTIONAL_FIELDS: Final = (
    "metric",
    "op",
    "threshold",
    "low",
    "high",
    "clear_threshold",
    "for_s",
    "window_s",
    "silent_s",
)


class RuleScope(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """At most one of these; none means every device."""

    device_id: ScopeValue | None = None
    site_id: ScopeValue | None = None
    device_type: DeviceType | None = None


class AlertRuleSpec(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    name: RuleName
    kind: RuleKind
    severity: Severity
    metric: str | None = None
    op: Op | None = None
    threshold: float | None = None
    low: float | None = None
    high: float | None = None
    clear_threshold: float | None = None
    for_s: Seconds | None = None
    window_s: Annotated[float, Meta(gt=0, le=24 * 3600)] | None = None
    silent_s: Annotated[float, Meta(gt=0, le=7 * 24 * 3600)] | None = None
    scope: RuleScope = msgspec.field(default_factory=RuleScope)
    enabled: bool = True


def rule_errors(rule: AlertRuleSpec) -> list[dict[str, str]]:
    """Field-level problems of a rule that types alone cannot catch; empty when it is sound."""
    errors: list[dict[str, str]] = []

    def err(field: str, message: str) -> None:
        errors.append({"field": field, "message": message})

    allowed = KIND_FIELDS[rule.kind]
    for name in OPTIONAL_FIELDS:
        if getattr(rule, name) is not None and name not in allowed:
            err(name, f"does not apply to a {rule.kind} rule")
    set_scopes = [k for k in ("device_id", "site_id", "device_type") if getattr(rule.scope, k)]
    if len(set_scopes) > 1:
        err("scope", "give at most one of device_id, site_id, device_type")
    if rule.kind == "offline":
        if rule.silent_s is None:
            err("silent_s", "required for an offline rule")
        return errors
    if rule.metric not in METRICS:
        err("metric", f"one of {', '.join(METRICS)}")
    if rule.kind == "rate_of_change":
        if rule.threshold is None or rule.threshold <= 0:
            err("threshold", "a positive change per second is required")
        if rule.window_s is None:
            err("window_s", "required for a rate_of_change rule")
        if rule.op == "outside":
            err("op", "gt or lt for a rate_of_change rule")
        return errors
    _threshold_errors(rule, err)
    return errors


def _threshold_errors(rule: AlertRuleSpec, err: Callable[[str, str], None]) -> None:
    if rule.op is None:
        err("op", "required for a threshold rule: gt, lt or outside")
    elif rule.op == "outside":
        if rule.low is None or rule.high is None or rule.low >= rule.high:
            err("low", "an outside rule needs low < high")
        if rule.threshold is not None:
            err("threshold", "an outside rule uses low and high")
    else:
        if rule.threshold is None:
            err("threshold", f"required for op {rule.op}")
        if rule.low is not None or rule.high is not None:
            err("low", f"low and high apply to op outside, not {rule.op}")
        clear = rule.clear_threshold
        if clear is not None and rule.threshold is not None:
            wrong_side = clear > rule.threshold if rule.op == "gt" else clear < rule.threshold
            if wrong_side:
                err("clear_threshold", "must lie on the safe side of threshold (hysteresis)")


class AlertRuleRecord(AlertRuleSpec, kw_only=True):
    """A stored rule as carried on the `alert-rules` topic (keyed by id)."""

    id: str


AlertEventKind = Literal["opened", "cleared"]


class AlertEvent(msgspec.Struct, frozen=True, kw_only=True):
    """One edge of an alert episode, on the `alerts` topic keyed by device id. The id is
    derived from rule, device and the episode's start, so a replay yields the same id."""

    alert_id: str
    kind: AlertEventKind
    rule_id: str
    rule_name: str
    device_id: str
    site_id: str
    severity: Severity
    at: datetime
    value: float | None = None
    message: str = ""
