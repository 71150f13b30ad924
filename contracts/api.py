"""Request and response bodies of the query API (the OpenAPI document is generated from these)."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
from msgspec import Meta

from contracts.alerting import AlertRuleSpec
from contracts.control import Status as CommandStatus
from contracts.readings import METRICS, TEXT_PATTERN, Identifier, Text

Role = Literal["admin", "operator", "viewer"]
AlertStatus = Literal[
    "active_unacknowledged", "active_acknowledged", "cleared", "cleared_unacknowledged"
]


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


class ReadingSeries(msgspec.Struct):
    device_id: str
    start: datetime
    end: datetime
    bucket_s: int
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


class CommandRequest(msgspec.Struct, forbid_unknown_fields=True):
    device_id: Identifier
    command: Identifier
    params: dict[str, Any] = msgspec.field(default_factory=dict)
    ttl_s: Annotated[int, Meta(ge=1, le=86_400)] | None = None


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
