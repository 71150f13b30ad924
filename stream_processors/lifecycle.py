"""Pure core of the controller: the command lifecycle as a state machine. No I/O, no clock.

    queued --requested--> processing --device reply--> succeeded | failed
       \\                      \\--deadline passes--> failed (timeout)
        \\--requested after its deadline--> failed (timeout)

Transitions only move forward: a terminal state absorbs every later reply or tick, and a
request seen twice (a redelivery) changes nothing. A request gives two events: `queued`, at
its `requested_at` and carrying the request (the control read model is built from the events
alone), then `processing` (or `failed`). A terminal state records since when it is terminal:
once that is longer ago than a retention (and so is the deadline, `expired`), the controller
forgets the command; a request whose deadline is that old (`stale`) is refused, never run.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import msgspec

from contracts.control import (
    TERMINAL,
    CommandDispatch,
    CommandRequested,
    CommandResult,
    ControlEvent,
    Status,
)

TIMEOUT = "timeout"


class CommandState(msgspec.Struct, kw_only=True):
    id: str
    device_id: str
    command: str
    params: dict[str, Any]
    deadline: datetime
    status: Status
    terminal_at: datetime | None = None  # None in states written before it was recorded

    def copy(self) -> CommandState:
        return msgspec.structs.replace(self)


Step = tuple[CommandState | None, list[ControlEvent], CommandDispatch | None]


def _event(state: CommandState, at: datetime, reason: str | None = None) -> ControlEvent:
    return ControlEvent(
        command_id=state.id, device_id=state.device_id, status=state.status, at=at, reason=reason
    )


def on_requested(state: CommandState | None, req: CommandRequested, now: datetime) -> Step:
    """A command request arrives: queue and dispatch it, or fail it if its deadline has passed."""
    if state is not None:
        return state, [], None  # seen before: a redelivery
    new = CommandState(
        id=req.id,
        device_id=req.device_id,
        command=req.command,
        params=req.params,
        deadline=req.deadline,
        status="processing",
    )
    queued = ControlEvent(
        command_id=req.id,
        device_id=req.device_id,
        status="queued",
        at=req.requested_at,
        request=req,
    )
    if now >= req.deadline:
        new.status, new.terminal_at = "failed", now
        return new, [queued, _event(new, now, TIMEOUT)], None
    dispatch = CommandDispatch(
        id=req.id,
        device_id=req.device_id,
        command=req.command,
        params=req.params,
        deadline=req.deadline,
    )
    return new, [queued, _event(new, now)], dispatch


def on_result(state: CommandState | None, result: CommandResult, now: datetime) -> Step:
    """A device replies: finish a processing command; ignore anything else."""
    if state is None or state.status != "processing" or result.device_id != state.device_id:
        return state, [], None  # unknown, already finished (a late reply), or not its device
    new = msgspec.structs.replace(state, status=result.status, terminal_at=now)
    reason = result.reason or None
    return new, [_event(new, now, reason if result.status == "failed" else None)], None


def on_tick(state: CommandState, now: datetime) -> Step:
    """Time passes: a command still processing at its deadline fails with `timeout`."""
    if state.status != "processing" or now < state.deadline:
        return state, [], None
    new = msgspec.structs.replace(state, status="failed", terminal_at=now)
    return new, [_event(new, now, TIMEOUT)], None


def is_terminal(state: CommandState) -> bool:
    return state.status in TERMINAL


def expired(state: CommandState, now: datetime, retention: timedelta) -> bool:
    """A terminal command, terminal and past its deadline for longer than `retention`: no
    request for it can still be accepted (`stale`), so its state may go. A state written
    without `terminal_at` counts from its deadline."""
    if state.status not in TERMINAL:
        return False
    since = state.deadline if state.terminal_at is None else max(state.terminal_at, state.deadline)
    return now - since > retention


def stale(req: CommandRequested, now: datetime, retention: timedelta) -> bool:
    """A request whose deadline lies more than `retention` in the past: its command's state
    may be gone already (`expired`), so it must be refused rather than run or failed again."""
    return now - req.deadline > retention
