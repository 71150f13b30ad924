"""Request and response bodies of the query API (the OpenAPI document is generated from these)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Final, Literal

import msgspec
from msgspec import Meta

from contracts.alerting import AlertRuleSpec, Severity
from contracts.control import MAX_TTL_S, MIN_TTL_S
from contracts.control import Status as CommandStatus
from contracts.readings import METRICS, TEXT_PATTERN, Identifier, Text

Role = Literal["admin", "operator", "viewer"]
AlertStatus = Literal[
    "active_unacknowledged", "active_acknowledged", "cleared", "cleared_unacknowledged"
]
# What alert filters take: a status, or `open` (every status but `cleared`).
AlertStatusFilter = Literal[
    "active_unacknowledged", "active_acknowledged", "cleared", "cleared_unacknowledged", "open"
]
# What a bulk acknowledgement's filter takes (it only ever takes unacknowledged alerts):
# `open` is both of the others.
UnacknowledgedStatus = Literal["active_unacknowledged", "cleared_unacknowledged", "open"]
# What the device list's `status` filter takes: `alerting` is a device with an alert in status
# active_unacknowledged or active_acknowledged.
DeviceStatusFilter = Literal["online", "offline", "alerting"]
MAX_ACK_IDS: Final = 1000


class LoginRequest(msgspec.Struct, forbid_unknown_fields=True):
    username: Annotated[str, Meta(min_length=1, max_length=100, pattern=TEXT_PATTERN)]
    password: Annotated[str, Meta(min_length=1, max_length=200)]


class TokenResponse(msgspec.Struct):
    access_token: str
    token_type: str
    expires_in: int
    role: Role


if TYPE_CHECKING:

    class Metrics(msgspec.Struct):
        """A device's latest reading: `ts` and every metric (`contracts.METRICS`)."""

        ts: datetime

        def __getattr__(self, metric: str) -> float | None: ...

else:  # built from the metric list, so a new metric appears here by itself
    Metrics = msgspec.defstruct(
        "Metrics", [("ts", datetime), *((m, float | None) for m in METRICS)], module=__name__
    )


class Device(msgspec.Struct):
    device_id: str
    site_id: str
    device_type: str
    status: Literal["online", "offline"]
    # an alert of the device is active (active_unacknowledged or active_acknowledged)
    alerting: bool
    first_seen: datetime
    last_seen: datetime
    latest: Metrics | None


class DevicePage(msgspec.Struct):
    items: list[Device]
    next_cursor: str | None


class Stat(msgspec.Struct):
    min: float
    avg: float
    max: float


class Bucket(msgspec.Struct):
    t: datetime
    count: int
    metrics: dict[str, Stat]


# Where a series' points came from: raw readings, or their 1-minute or 1-hour rollups.
ReadingSource = Literal["raw", "1m", "1h"]


class ReadingSeries(msgspec.Struct):
    device_id: str
    start: datetime
    end: datetime
    bucket_s: int
    source: ReadingSource
    points: list[Bucket]


class Alert(msgspec.Struct):
    id: str
    rule_id: str
    device_id: str
    site_id: str
    severity: str
    status: str
    message: str
    value: float | None
    opened_at: datetime
    cleared_at: datetime | None
    acknowledged_at: datetime | None
    acknowledged_by: str | None


class AlertPage(msgspec.Struct):
    items: list[Alert]
    next_cursor: str | None


class Notification(msgspec.Struct):
    id: str
    alert_id: str | None
    device_id: str
    site_id: str
    kind: str
    severity: str
    title: str
    created_at: datetime
    read: bool
    acked_at: datetime | None
    acked_by: str | None


class NotificationPage(msgspec.Struct):
    items: list[Notification]
    next_cursor: str | None


class AlertGroup(msgspec.Struct):
    """The alerts of one rule on one site with one severity."""

    rule_id: str
    rule_name: str  # the rule's id when the rule was deleted since
    site_id: str
    severity: str
    count: int
    unacknowledged: int
    devices: int  # distinct devices
    first_opened_at: datetime
    last_opened_at: datetime


class AlertGroups(msgspec.Struct):
    items: list[AlertGroup]
    truncated: bool  # there were more groups than the answer holds


_NOT_NULL: dict[str, Any] = {"not": {"type": "null"}}


class AlertAckRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Acknowledge alerts in bulk: either `ids` (1 to 1,000 alert ids), or a filter of at least
    one of `rule_id`, `site_id`, `device_id`, `severity`, `status`, never both."""

    FILTERS: ClassVar[tuple[str, ...]] = ("rule_id", "site_id", "device_id", "severity", "status")
    # in the OpenAPI document too (runtime.openapi.StructSchemas): ids or a filter
    json_schema_extra: ClassVar[dict[str, Any]] = {
        "anyOf": [
            {
                "required": ["ids"],
                "properties": {"ids": _NOT_NULL, **{f: {"type": "null"} for f in FILTERS}},
            },
            {
                "properties": {"ids": {"type": "null"}},
                "anyOf": [{"required": [f], "properties": {f: _NOT_NULL}} for f in FILTERS],
            },
        ]
    }

    # any strings: one that is no alert's id comes back as unknown
    ids: Annotated[list[str], Meta(min_length=1, max_length=MAX_ACK_IDS)] | None = None
    rule_id: uuid.UUID | None = None
    site_id: Identifier | None = None
    device_id: Identifier | None = None
    severity: Severity | None = None
    status: UnacknowledgedStatus | None = None

    def problems(self) -> list[dict[str, str]]:
        """What makes the request neither ids nor a filter; empty when it is one of them."""
        filters = [f for f in self.FILTERS if getattr(self, f) is not None]
        if self.ids is not None and filters:
            return [
                {"field": f, "message": "give either ids or a filter, not both"} for f in filters
            ]
        if self.ids is None and not filters:
            return [
                {
                    "field": "ids",
                    "message": "give ids (1 to 1,000 alert ids) or a filter of at least one of"
                    f" {', '.join(self.FILTERS)}",
                }
            ]
        return []


class AlertAckResult(msgspec.Struct):
    """What a bulk acknowledgement queued: `acknowledged`, the alerts whose acknowledgement is
    queued; of the request's ids, `already` those acknowledged before and `unknown` those not
    found (or of another site); `more`, a filter matched more alerts than one call takes."""

    acknowledged: list[str]
    already: list[str]
    unknown: list[str]
    more: bool


class CommandRequest(msgspec.Struct, forbid_unknown_fields=True):
    device_id: Identifier
    command: Identifier
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    ttl_s: Annotated[int, Meta(ge=MIN_TTL_S, le=MAX_TTL_S)] | None = None


class Accepted(msgspec.Struct):
    """Stored, not yet shown by the read model: it will be (the change is in the outbox)."""

    id: str
    status: Literal["accepted"] = "accepted"


class CommandAccepted(msgspec.Struct):
    id: str
    status: CommandStatus


class Transition(msgspec.Struct, omit_defaults=True):
    status: CommandStatus
    at: datetime
    reason: str | None = None


class ControlCommand(msgspec.Struct):
    id: str
    device_id: str
    command: str
    params: dict[str, Any]
    status: CommandStatus
    reason: str | None
    ttl_s: int
    deadline: datetime
    requested_by: str
    created_at: datetime
    updated_at: datetime
    history: list[Transition]
    delivered_at: datetime | None = None  # when the device fetched it over HTTP


class CommandPage(msgspec.Struct):
    items: list[ControlCommand]
    next_cursor: str | None


class ParamRange(msgspec.Struct):
    """The values a command parameter takes: a number in [min, max]."""

    min: float
    max: float


class CommandCatalogue(msgspec.Struct):
    """What `POST /api/v1/control/commands` accepts: for each device type, its commands, each
    with its parameters (an empty object: none); and the bounds and default of `ttl_s`."""

    device_types: dict[str, dict[str, dict[str, ParamRange]]]
    default_ttl_s: int
    min_ttl_s: int
    max_ttl_s: int


class DeviceCounts(msgspec.Struct):
    total: int
    online: int
    offline: int
    alerting: int


class AlertCounts(msgspec.Struct):
    """Open alerts (every status but cleared) by severity."""

    critical: int
    major: int
    minor: int
    warning: int


class SiteSummary(msgspec.Struct):
    site_id: str
    devices: int
    online: int
    alerting: int


class Overview(msgspec.Struct):
    devices: DeviceCounts
    alerts: AlertCounts
    unread_notifications: int
    sites: list[SiteSummary]
    sites_truncated: bool  # there were more sites than the answer holds
    offline_after_s: int  # a device is offline when its last reading is older than this


class AlertRulePage(msgspec.Struct):
    items: list[AlertRuleSpec]
    next_cursor: str | None


class RegisterDevice(msgspec.Struct, forbid_unknown_fields=True):
    """Give a device to a site (admins)."""

    device_id: Identifier
    site_id: Identifier


class MoveDevice(msgspec.Struct, forbid_unknown_fields=True):
    """Give a registered device to another site (admins); the reason is recorded."""

    site_id: Identifier
    reason: Annotated[Text, Meta(min_length=1, max_length=500)]


class Registration(msgspec.Struct):
    """Which site a device belongs to, since when and who registered it."""

    device_id: str
    site_id: str
    registered_at: datetime
    registered_by: str


class RegistrationPage(msgspec.Struct):
    items: list[Registration]
    next_cursor: str | None


class DeviceMove(msgspec.Struct):
    device_id: str
    from_site: str
    to_site: str
    moved_by: str
    reason: str
    moved_at: datetime


class RegisteredDevice(msgspec.Struct):
    """A device's registration and every move between sites, oldest first."""

    device_id: str
    site_id: str
    registered_at: datetime
    registered_by: str
    moves: list[DeviceMove]
