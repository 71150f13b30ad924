"""Alert rules: one Struct per kind, in a union tagged by `kind`, and the alert events they raise.
Shared by the query API (which stores rules) and the alerter (which evaluates them).

msgspec decodes a rule once, into the Struct of its kind, checking types, ranges and which fields
the kind takes; `problems` adds the checks between fields that types cannot express. A rule is
the same type as the admin sends it, as the `alert-rules` topic carries it (with its `id`) and as
the API answers it (with `id` and timestamps). Adding a kind is a Struct here, added to
`AlertRuleSpec`, and its evaluation in `stream_processors.alerting`.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Final, Literal, get_args

import msgspec
from msgspec import Meta

from contracts.readings import METRICS, TEXT_PATTERN, DeviceType

Op = Literal["gt", "lt", "outside"]
Severity = Literal["critical", "major", "minor", "warning"]
SEVERITIES: Final[tuple[str, ...]] = get_args(Severity)
Seconds = Annotated[float, Meta(ge=0, le=7 * 24 * 3600)]
RuleName = Annotated[str, Meta(min_length=1, max_length=200, pattern=TEXT_PATTERN)]
ScopeValue = Annotated[str, Meta(min_length=1, max_length=64, pattern=TEXT_PATTERN)]
# readOnly in the OpenAPI document (runtime.openapi.READ_ONLY)
ServerSet = Meta(description="set by the server; refused in a request", extra={"read_only": True})
if TYPE_CHECKING:
    Metric = str
else:  # one of the reading's metrics, as the type says
    Metric = Literal[METRICS]

FieldError = dict[str, str]


def _error(field: str, message: str) -> FieldError:
    return {"field": field, "message": message}


_NOT_NULL: Final[dict[str, Any]] = {"not": {"type": "null"}}


class RuleScope(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """At most one of these; none means every device."""

    # in the OpenAPI document too (runtime.openapi.StructSchemas): no two given and not null
    json_schema_extra: ClassVar[dict[str, Any]] = {
        "not": {
            "anyOf": [
                {"required": [a, b], "properties": {a: _NOT_NULL, b: _NOT_NULL}}
                for a, b in (
                    ("device_id", "site_id"),
                    ("device_id", "device_type"),
                    ("site_id", "device_type"),
                )
            ]
        }
    }

    device_id: ScopeValue | None = None
    site_id: ScopeValue | None = None
    device_type: DeviceType | None = None


class AlertRuleBase(
    msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True, tag_field="kind"
):
    """What every kind of rule has."""

    name: RuleName
    severity: Severity
    scope: RuleScope = msgspec.field(default_factory=RuleScope)
    enabled: bool = msgspec.field(default_factory=lambda: True)  # a factory: always encoded
    id: Annotated[str, ServerSet] | None = None
    created_at: Annotated[datetime, ServerSet] | None = None
    updated_at: Annotated[datetime, ServerSet] | None = None

    def problems(self) -> list[FieldError]:
        """What is wrong with the rule beyond what its type checks; empty when it is sound."""
        errors = [_error(f, "set by the server") for f in SERVER_SET if getattr(self, f)]
        scopes = [k for k in ("device_id", "site_id", "device_type") if getattr(self.scope, k)]
        if len(scopes) > 1:
            errors.append(_error("scope", "give at most one of device_id, site_id, device_type"))
        return errors


class ThresholdRule(AlertRuleBase, tag="threshold"):
    """A metric above (`gt`) or below (`lt`) `threshold`, or `outside` [`low`, `high`], for at
    least `for_s`; an open alert clears past `clear_threshold` (hysteresis, default
    `threshold`) or back inside [`low`, `high`]."""

    # in the OpenAPI document too: which fields each op takes (what problems() checks beyond
    # that, low < high and the side of clear_threshold, no schema can say)
    json_schema_extra: ClassVar[dict[str, Any]] = {
        "anyOf": [
            {
                "required": ["op", "low", "high"],
                "properties": {
                    "op": {"const": "outside"},
                    "low": {"type": "number"},
                    "high": {"type": "number"},
                    "threshold": {"type": "null"},
                },
            },
            {
                "required": ["op", "threshold"],
                "properties": {
                    "op": {"enum": ["gt", "lt"]},
                    "threshold": {"type": "number"},
                    "low": {"type": "null"},
                    "high": {"type": "null"},
                },
            },
        ]
    }

    metric: Metric
    op: Op
    threshold: float | None = None
    low: float | None = None
    high: float | None = None
    clear_threshold: float | None = None
    for_s: Seconds | None = None

    def problems(self) -> list[FieldError]:
        errors = super().problems()
        if self.op == "outside":
            if self.low is None or self.high is None or self.low >= self.high:
                errors.append(_error("low", "an outside rule needs low < high"))
            if self.threshold is not None:
                errors.append(_error("threshold", "an outside rule uses low and high"))
            return errors
        if self.threshold is None:
            errors.append(_error("threshold", f"required for op {self.op}"))
        if self.low is not None or self.high is not None:
            errors.append(_error("low", f"low and high apply to op outside, not {self.op}"))
        clear, limit = self.clear_threshold, self.threshold
        if (
            clear is not None
            and limit is not None
            and (clear > limit if self.op == "gt" else clear < limit)
        ):
            errors.append(
                _error("clear_threshold", "must lie on the safe side of threshold (hysteresis)")
            )
        return errors


class RateOfChangeRule(AlertRuleBase, tag="rate_of_change"):
    """A metric changing faster than `threshold` per second over `window_s`: rising (`gt`),
    falling (`lt`) or either way (no `op`), for at least `for_s`."""

    metric: Metric
    threshold: Annotated[float, Meta(gt=0)]
    window_s: Annotated[float, Meta(gt=0, le=24 * 3600)]
    op: Literal["gt", "lt"] | None = None
    for_s: Seconds | None = None


class OfflineRule(AlertRuleBase, tag="offline"):
    """No reading from a device for longer than `silent_s`."""

    silent_s: Annotated[float, Meta(gt=0, le=7 * 24 * 3600)]


AlertRuleSpec = ThresholdRule | RateOfChangeRule | OfflineRule
RuleKind = Literal["threshold", "rate_of_change", "offline"]
RULE_KINDS: Final[dict[str, type[AlertRuleBase]]] = {
    kind.__struct_config__.tag: kind for kind in get_args(AlertRuleSpec)
}
assert set(RULE_KINDS) == set(get_args(RuleKind)), "RuleKind names every kind of AlertRuleSpec"
SERVER_SET: Final = ("id", "created_at", "updated_at")
COMMON_FIELDS: Final = frozenset(f.name for f in msgspec.structs.fields(AlertRuleBase))


AlertEventKind = Literal["opened", "cleared", "acknowledged", "read"]


class AlertEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """On the `alerts` topic keyed by device id: an edge of an alert episode (`opened`,
    `cleared`, from the alerter), an operator's acknowledgement of the alert (`acknowledged`,
    by `by`) or of one of its notifications (`read`, `notification_id`), from the query API.
    The alert id is derived from rule, device and the episode's start, so a replay yields the
    same id; the first acknowledgement wins."""

    alert_id: str
    kind: AlertEventKind
    rule_id: str
    rule_name: Annotated[str, Meta(pattern=TEXT_PATTERN)]
    device_id: str
    site_id: str
    severity: Severity
    at: datetime
    value: float | None = None
    message: Annotated[str, Meta(pattern=TEXT_PATTERN)] = ""
    by: Annotated[str, Meta(pattern=TEXT_PATTERN)] | None = None
    notification_id: str | None = None
