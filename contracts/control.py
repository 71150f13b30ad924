"""Control commands a device accepts, by device type, and the checks on their parameters."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

from contracts.readings import TEXT_PATTERN

# command -> {param: (low, high)}; an empty dict means the command takes no parameters.
ANY_DEVICE: Final[dict[str, dict[str, tuple[float, float]]]] = {"reboot": {}}
COMMANDS: Final[dict[str, dict[str, dict[str, tuple[float, float]]]]] = {
    "battery": {"charge": {"power_kw": (0.1, 10_000)}, "discharge": {"power_kw": (0.1, 10_000)}},
    "pv_inverter": {"limit_power": {"limit_pct": (0, 100)}},
    "genset": {"start": {}, "stop": {}},
    "load": {},
    "meter": {},
}
DEFAULT_TTL_S: Final = 60
# the bounds of a request's `ttl_s` (seconds until its deadline)
MIN_TTL_S: Final = 1
MAX_TTL_S: Final = 86_400


def commands_for(device_type: str) -> dict[str, dict[str, tuple[float, float]]]:
    return {**COMMANDS.get(device_type, {}), **ANY_DEVICE}


def command_errors(device_type: str, command: str, params: dict[str, Any]) -> list[dict[str, str]]:
    """Field-level problems of a command for a device of this type; empty when it is valid."""
    allowed = commands_for(device_type)
    if command not in allowed:
        return [
            {"field": "command", "message": f"a {device_type} accepts {', '.join(sorted(allowed))}"}
        ]
    spec = allowed[command]
    errors = [
        {"field": f"params.{name}", "message": f"not a parameter of {command}"}
        for name in params
        if name not in spec
    ]
    for name, (low, high) in spec.items():
        value = params.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            errors.append({"field": f"params.{name}", "message": f"a number in [{low}, {high}]"})
        elif not low <= value <= high:
            errors.append({"field": f"params.{name}", "message": f"must lie in [{low}, {high}]"})
    return errors


Status = Literal["queued", "processing", "succeeded", "failed"]
Reason = Annotated[str, Meta(max_length=500, pattern=TEXT_PATTERN)]
TERMINAL: Final = ("succeeded", "failed")


class CommandRequested(msgspec.Struct, frozen=True, kw_only=True):
    """On `control.commands`, keyed by device id: an operator asked for this."""

    id: str
    device_id: str
    command: str
    params: dict[str, Any]
    requested_at: datetime
    deadline: datetime
    requested_by: str = ""
    site_id: str = ""  # the device's owner when it was requested
    # the site has topics of its own: dispatch on `site.<site_id>.dispatch`, not control.dispatch
    site_topics: bool = False


class CommandDispatch(msgspec.Struct, frozen=True, kw_only=True):
    """On `control.dispatch`, or its site's `site.<site>.dispatch`, keyed by device id: what a
    device is to execute."""

    id: str
    device_id: str
    command: str
    params: dict[str, Any]
    deadline: datetime


class CommandResult(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A device's reply: on `control.results` (or its site's `site.<site>.results`) keyed by
    device id, or `POST /api/v1/control/commands/{id}/result` (where `id` and `device_id` come
    from the path and the key)."""

    status: Literal["succeeded", "failed"]
    reason: Reason = ""
    id: str = ""
    device_id: str = ""


class CommandReply(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A device's answer over HTTP (`POST /api/v1/control/commands/{id}/result`): the command
    is the path's and the device the key's."""

    status: Literal["succeeded", "failed"]
    reason: Reason = ""
    id: str = msgspec.field(default="")  # accepted and ignored: the path's command
    device_id: str = msgspec.field(default="")  # accepted and ignored: the key's device


class ControlEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """On `control.events`, keyed by device id: one lifecycle transition, or (`delivered`) the
    hand-over of a processing command to a device over HTTP. The `queued` event carries the
    request, so the control read model is built from this topic alone."""

    command_id: str
    device_id: str
    status: Status
    at: datetime
    reason: Reason | None = None
    request: CommandRequested | None = None
    delivered: bool = False
