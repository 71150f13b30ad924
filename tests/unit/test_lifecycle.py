"""The control-command lifecycle as a pure state machine: every state x input, plus properties
over random input sequences (monotonic status, one terminal event, one dispatch, absorbing
terminal states, and a state that survives a msgspec.json round trip as the controller's crash
recovery needs)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Literal

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.control import (
    TERMINAL,
    CommandDispatch,
    CommandRequested,
    CommandResult,
    ControlEvent,
    Status,
)
from stream_processors.lifecycle import (
    TIMEOUT,
    CommandState,
    Step,
    expired,
    is_terminal,
    on_requested,
    on_result,
    on_tick,
    stale,
)

T0 = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
DEADLINE = T0 + timedelta(seconds=60)
CMD = "cmd-1"
DEV = "bat-1"
OTHER_DEV = "bat-2"
COMMAND = "charge"
PARAMS: dict[str, Any] = {"power_kw": 5.5}
US = timedelta(microseconds=1)

REQ = CommandRequested(
    id=CMD, device_id=DEV, command=COMMAND, params=PARAMS, requested_at=T0, deadline=DEADLINE
)


def state_with(status: Status) -> CommandState:
    return CommandState(
        id=CMD,
        device_id=DEV,
        command=COMMAND,
        params=dict(PARAMS),
        deadline=DEADLINE,
        status=status,
    )


def event(status: Status, at: datetime, reason: str | None = None) -> ControlEvent:
    if status == "queued":  # the first event of a request: at its request time, carrying it
        return ControlEvent(
            command_id=CMD, device_id=DEV, status="queued", at=REQ.requested_at, request=REQ
        )
    return ControlEvent(command_id=CMD, device_id=DEV, status=status, at=at, reason=reason)


def roundtrip(state: CommandState) -> CommandState:
    return msgspec.json.decode(msgspec.json.encode(state), type=CommandState)


# ------------------------------------------------------------------------------------------
# The exhaustive table: every starting state x every kind of input.
# ------------------------------------------------------------------------------------------

StartName = Literal["none", "processing", "succeeded", "failed"]
START_STATES: tuple[StartName, ...] = ("none", "processing", "succeeded", "failed")


@dataclass(frozen=True)
class Input:
    name: str
    now: datetime
    apply: Callable[[CommandState | None, datetime], Step]
    needs_state: bool = False  # on_tick is only defined on a command the controller holds


def _reply(
    status: Literal["succeeded", "failed"], reason: str = "", device_id: str = DEV, cmd: str = CMD
) -> Callable[[CommandState | None, datetime], Step]:
    result = CommandResult(status=status, reason=reason, id=cmd, device_id=device_id)
    return lambda state, now: on_result(state, result, now)


def _request(state: CommandState | None, now: datetime) -> Step:
    return on_requested(state, REQ, now)


def _tick(state: CommandState | None, now: datetime) -> Step:
    assert state is not None
    return on_tick(state, now)


INPUTS: dict[str, Input] = {
    i.name: i
    for i in (
        Input("request_before_deadline", DEADLINE - timedelta(seconds=30), _request),
        Input("request_just_before_deadline", DEADLINE - US, _request),
        Input("request_at_deadline", DEADLINE, _request),
        Input("request_after_deadline", DEADLINE + timedelta(seconds=30), _request),
        Input("reply_succeeded", DEADLINE - timedelta(seconds=10), _reply("succeeded")),
        Input(
            "reply_succeeded_with_reason",
            DEADLINE - timedelta(seconds=10),
            _reply("succeeded", "all good"),
        ),
        Input(
            "reply_succeeded_after_deadline_before_tick",
            DEADLINE + timedelta(seconds=5),
            _reply("succeeded"),
        ),
        Input(
            "reply_succeeded_without_command_id",
            DEADLINE - timedelta(seconds=10),
            _reply("succeeded", cmd=""),
        ),
        Input(
            "reply_failed_with_reason",
            DEADLINE - timedelta(seconds=10),
            _reply("failed", "overheated"),
        ),
        Input("reply_failed_without_reason", DEADLINE - timedelta(seconds=10), _reply("failed")),
        Input(
            "reply_succeeded_other_device",
            DEADLINE - timedelta(seconds=10),
            _reply("succeeded", device_id=OTHER_DEV),
        ),
        Input(
            "reply_failed_other_device",
            DEADLINE - timedelta(seconds=10),
            _reply("failed", "nope", device_id=OTHER_DEV),
        ),
        Input("tick_before_deadline", DEADLINE - timedelta(seconds=30), _tick, needs_state=True),
        Input("tick_just_before_deadline", DEADLINE - US, _tick, needs_state=True),
        Input("tick_at_deadline", DEADLINE, _tick, needs_state=True),
        Input("tick_after_deadline", DEADLINE + timedelta(seconds=30), _tick, needs_state=True),
    )
}

# Expected outcome: (resulting status or None, [(event status, event reason)], dispatched?).
# "same" means the state must come back unchanged.
Expect = tuple[Status | Literal["same"] | None, list[tuple[Status, str | None]], bool]
UNCHANGED: Expect = ("same", [], False)
PROCESSING_EXPECT: dict[str, Expect] = {
    "request_before_deadline": UNCHANGED,  # a redelivery
    "request_just_before_deadline": UNCHANGED,
    "request_at_deadline": UNCHANGED,
    "request_after_deadline": UNCHANGED,
    "reply_succeeded": ("succeeded", [("succeeded", None)], False),
    "reply_succeeded_with_reason": ("succeeded", [("succeeded", None)], False),
    "reply_succeeded_after_deadline_before_tick": ("succeeded", [("succeeded", None)], False),
    "reply_succeeded_without_command_id": ("succeeded", [("succeeded", None)], False),
    "reply_failed_with_reason": ("failed", [("failed", "overheated")], False),
    "reply_failed_without_reason": ("failed", [("failed", None)], False),
    "reply_succeeded_other_device": UNCHANGED,
    "reply_failed_other_device": UNCHANGED,
    "tick_before_deadline": UNCHANGED,
    "tick_just_before_deadline": UNCHANGED,
    "tick_at_deadline": ("failed", [("failed", TIMEOUT)], False),
    "tick_after_deadline": ("failed", [("failed", TIMEOUT)], False),
}
NONE_EXPECT: dict[str, Expect] = {
    "request_before_deadline": ("processing", [("queued", None), ("processing", None)], True),
    "request_just_before_deadline": (
        "processing",
        [("queued", None), ("processing", None)],
        True,
    ),
    "request_at_deadline": ("failed", [("queued", None), ("failed", TIMEOUT)], False),
    "request_after_deadline": ("failed", [("queued", None), ("failed", TIMEOUT)], False),
    # a reply for a command never seen: nothing to finish
    **{name: (None, [], False) for name in INPUTS if name.startswith("reply_")},
}
EXPECTED: dict[StartName, dict[str, Expect]] = {
    "none": NONE_EXPECT,
    "processing": PROCESSING_EXPECT,
    "succeeded": dict.fromkeys(INPUTS, UNCHANGED),  # terminal states absorb everything
    "failed": dict.fromkeys(INPUTS, UNCHANGED),
}

CASES = [
    pytest.param(start, name, id=f"{start}-{name}")
    for start in START_STATES
    for name, inp in INPUTS.items()
    # on_tick takes a CommandState: a command the controller has never seen has no deadline to
    # tick, so there is no (None, tick) cell.
    if not (start == "none" and inp.needs_state)
]


def test_the_table_is_complete() -> None:
    assert len(CASES) == 4 * len(INPUTS) - 4
    for start in START_STATES:
        assert set(EXPECTED[start]) >= {
            n for n, i in INPUTS.items() if start != "none" or not i.needs_state
        }


@pytest.mark.parametrize(("start", "input_name"), CASES)
def test_transition_table(start: StartName, input_name: str) -> None:
    inp = INPUTS[input_name]
    state = None if start == "none" else state_with(start)
    snapshot = copy.deepcopy(state)
    want_status, want_events, want_dispatch = EXPECTED[start][input_name]

    new, events, dispatch = inp.apply(state, inp.now)

    # the given state is never mutated
    assert state == snapshot
    if state is not None:
        assert msgspec.json.encode(state) == msgspec.json.encode(snapshot)

    if want_status == "same":
        assert new == snapshot
    elif want_status is None:
        assert new is None
    else:
        assert new is not None
        assert new is not state  # a new object, not the given one changed in place
        assert new == CommandState(
            id=CMD,
            device_id=DEV,
            command=COMMAND,
            params=PARAMS,
            deadline=DEADLINE,
            status=want_status,
            terminal_at=inp.now if want_status in TERMINAL else None,
        )

    assert events == [event(status, inp.now, reason) for status, reason in want_events]

    if want_dispatch:
        assert dispatch == CommandDispatch(
            id=CMD, device_id=DEV, command=COMMAND, params=PARAMS, deadline=DEADLINE
        )
    else:
        assert dispatch is None


@pytest.mark.parametrize(("start", "input_name"), CASES)
def test_transition_table_from_a_restored_state(start: StartName, input_name: str) -> None:
    """Every cell gives the same answer from a state decoded after a crash."""
    inp = INPUTS[input_name]
    state = None if start == "none" else state_with(start)
    restored = None if state is None else roundtrip(state)
    assert restored == state
    assert inp.apply(restored, inp.now) == inp.apply(state, inp.now)


def test_redelivered_request_with_the_same_id_is_ignored_even_if_it_differs() -> None:
    state, _, _ = on_requested(None, REQ, T0)
    assert state is not None
    again = msgspec.structs.replace(REQ, params={"power_kw": 9.0}, requested_at=T0 + US)
    assert on_requested(state, again, T0 + timedelta(seconds=1)) == (state, [], None)


def test_late_reply_after_a_timeout_is_absorbed() -> None:
    state, _, _ = on_requested(None, REQ, T0)
    assert state is not None
    state, events, _ = on_tick(state, DEADLINE)
    assert state is not None
    assert events == [event("failed", DEADLINE, TIMEOUT)]
    late = CommandResult(status="succeeded", id=CMD, device_id=DEV)
    assert on_result(state, late, DEADLINE + timedelta(seconds=1)) == (state, [], None)
    assert state.status == "failed"


def test_events_carry_the_now_passed_in_even_in_another_timezone() -> None:
    now = (DEADLINE - timedelta(seconds=5)).astimezone(timezone(timedelta(hours=-7)))
    _, events, _ = on_requested(None, REQ, now)
    assert [e.at for e in events] == [REQ.requested_at, now]  # queued when it was requested
    assert events[1].at.utcoffset() == timedelta(hours=-7)


def test_event_without_reason_omits_it_on_the_wire() -> None:
    _, events, _ = on_requested(None, REQ, T0)
    assert b"reason" not in msgspec.json.encode(events[-1])
    _, events, _ = on_requested(None, REQ, DEADLINE)
    assert msgspec.json.decode(msgspec.json.encode(events[-1]))["reason"] == TIMEOUT


def test_a_request_is_queued_with_its_request_then_processing() -> None:
    _, events, _ = on_requested(None, REQ, T0 + timedelta(seconds=1))
    assert [(e.status, e.at, e.request) for e in events] == [
        ("queued", T0, REQ),
        ("processing", T0 + timedelta(seconds=1), None),
    ]
    wire = msgspec.json.decode(msgspec.json.encode(events[0]), type=ControlEvent)
    assert wire.request == REQ  # the read model gets the whole request from the event


RETENTION = timedelta(seconds=60)


def test_a_terminal_command_expires_once_terminal_and_past_its_deadline_for_the_retention() -> None:
    state, _, _ = on_requested(None, REQ, T0)
    assert state is not None
    early = T0 + timedelta(seconds=5)  # succeeded well before its deadline
    done, _, _ = on_result(state, CommandResult(status="succeeded", id=CMD, device_id=DEV), early)
    assert done is not None and done.terminal_at == early
    assert not expired(state, DEADLINE + RETENTION * 2, RETENTION)  # still processing
    # kept until the deadline, too, is a retention old: until then a request is not stale
    assert not expired(done, early + RETENTION + US, RETENTION)
    assert not expired(done, DEADLINE + RETENTION, RETENTION)
    assert expired(done, DEADLINE + RETENTION + US, RETENTION)
    assert not stale(REQ, DEADLINE + RETENTION, RETENTION)
    assert stale(REQ, DEADLINE + RETENTION + US, RETENTION)


def test_a_terminal_state_written_without_terminal_at_expires_from_its_deadline() -> None:
    old = msgspec.json.decode(msgspec.json.encode(state_with("succeeded")), type=CommandState)
    assert old.terminal_at is None
    assert not expired(old, DEADLINE + RETENTION, RETENTION)
    assert expired(old, DEADLINE + RETENTION + US, RETENTION)


def test_is_terminal_and_constants() -> None:
    assert TIMEOUT == "timeout"
    assert set(TERMINAL) == {"succeeded", "failed"}
    assert not is_terminal(state_with("queued"))
    assert not is_terminal(state_with("processing"))
    assert is_terminal(state_with("succeeded"))
    assert is_terminal(state_with("failed"))


@pytest.mark.parametrize("status", ["queued", "processing", "succeeded", "failed"])
def test_state_round_trips_through_json(status: Status) -> None:
    state = state_with(status)
    assert roundtrip(state) == state


# ------------------------------------------------------------------------------------------
# Properties over random input sequences.
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Req:
    now: datetime


@dataclass(frozen=True)
class Reply:
    result: CommandResult
    now: datetime


@dataclass(frozen=True)
class Tick:
    now: datetime


Op = Req | Reply | Tick

TZS = [UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5, minutes=-30))]

ids = st.text(alphabet="abcdef0123456789-", min_size=1, max_size=8)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
params_st = st.dictionaries(
    st.text(max_size=8),
    st.one_of(json_scalars, st.lists(json_scalars, max_size=3)),
    max_size=3,
)


@st.composite
def requests(draw: st.DrawFn) -> CommandRequested:
    deadline = T0 + timedelta(microseconds=draw(st.integers(0, 600_000_000)))
    deadline = deadline.astimezone(draw(st.sampled_from(TZS)))
    return CommandRequested(
        id=draw(ids),
        device_id=draw(ids),
        command=draw(st.sampled_from(["charge", "discharge", "reboot", "start"])),
        params=draw(params_st),
        requested_at=T0,
        deadline=deadline,
    )


def times_around(deadline: datetime) -> st.SearchStrategy[datetime]:
    offsets = st.one_of(
        st.sampled_from([timedelta(0), -US, US]),
        st.integers(-120_000_000, 120_000_000).map(lambda us: timedelta(microseconds=us)),
    )
    return st.builds(lambda off, tz: (deadline + off).astimezone(tz), offsets, st.sampled_from(TZS))


def ops_for(req: CommandRequested) -> st.SearchStrategy[list[Op]]:
    when = times_around(req.deadline)
    results = st.builds(
        CommandResult,
        status=st.sampled_from(["succeeded", "failed"]),
        reason=st.one_of(st.just(""), st.just("overheated"), st.text(max_size=20)),
        id=st.sampled_from([req.id, ""]),
        device_id=st.sampled_from([req.device_id, req.device_id + "-other"]),
    )
    op: st.SearchStrategy[Op] = st.one_of(
        st.builds(Req, when),
        st.builds(Reply, results, when),
        st.builds(Tick, when),
    )
    return st.lists(op, max_size=12)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[CommandRequested, list[Op]]:
    req = draw(requests())
    ops = draw(ops_for(req))
    # duplicates: re-insert some of the drawn inputs (redeliveries) at random positions
    for _ in range(draw(st.integers(0, 3))):
        if not ops:
            break
        dup = ops[draw(st.integers(0, len(ops) - 1))]
        ops.insert(draw(st.integers(0, len(ops))), dup)
    return req, ops


def step(state: CommandState | None, req: CommandRequested, op: Op) -> Step:
    if isinstance(op, Req):
        return on_requested(state, req, op.now)
    if isinstance(op, Reply):
        return on_result(state, op.result, op.now)
    if state is None:  # the controller only ticks the commands it holds
        return state, [], None
    return on_tick(state, op.now)


def run(
    state: CommandState | None, req: CommandRequested, ops: list[Op]
) -> list[tuple[CommandState | None, list[ControlEvent], CommandDispatch | None]]:
    out = []
    for op in ops:
        snapshot = copy.deepcopy(state)
        new, events, dispatch = step(state, req, op)
        assert state == snapshot, "a lifecycle function mutated the state it was given"
        out.append((new, events, dispatch))
        state = new
    return out


RANK: dict[Status | None, int] = {
    None: 0,
    "queued": 0,
    "processing": 1,
    "succeeded": 2,
    "failed": 2,
}


def status_of(state: CommandState | None) -> Status | None:
    return None if state is None else state.status


# database=None: nothing is written to .hypothesis/ by this module
PROPS = settings(max_examples=150, deadline=None, database=None)


@PROPS
@given(scenarios())
def test_status_is_monotonic_and_events_match_transitions(
    scenario: tuple[CommandRequested, list[Op]],
) -> None:
    req, ops = scenario
    prev: CommandState | None = None
    for op, (new, events, dispatch) in zip(ops, run(None, req, ops), strict=True):
        before, after = status_of(prev), status_of(new)
        assert RANK[after] >= RANK[before], f"{before} -> {after}"
        assert (before, after) in {
            (None, None),
            (None, "processing"),
            (None, "failed"),
            ("processing", "processing"),
            ("processing", "succeeded"),
            ("processing", "failed"),
            ("succeeded", "succeeded"),
            ("failed", "failed"),
        }
        if before == after:
            assert new == prev
            assert events == []
            assert dispatch is None
        else:
            assert new is not None
            if before is None:  # a request: first queued, at its request time, carrying it
                queued, *events = events
                assert queued == ControlEvent(
                    command_id=req.id,
                    device_id=req.device_id,
                    status="queued",
                    at=req.requested_at,
                    request=req,
                )
            assert len(events) == 1
            (ev,) = events
            assert (ev.command_id, ev.device_id, ev.status, ev.at) == (
                req.id,
                req.device_id,
                after,
                op.now,
            )
            assert (new.id, new.device_id, new.command, new.params, new.deadline) == (
                req.id,
                req.device_id,
                req.command,
                req.params,
                req.deadline,
            )
            if ev.reason is not None:
                assert ev.reason != ""
            if after == "succeeded":
                assert ev.reason is None
        prev = new


@PROPS
@given(scenarios())
def test_at_most_one_terminal_event_and_one_dispatch(
    scenario: tuple[CommandRequested, list[Op]],
) -> None:
    req, ops = scenario
    steps = run(None, req, ops)
    events = [e for _, evs, _ in steps for e in evs]
    dispatches = [d for _, _, d in steps if d is not None]
    assert sum(e.status in TERMINAL for e in events) <= 1
    assert sum(e.status == "processing" for e in events) <= 1
    assert len(dispatches) <= 1
    for d in dispatches:
        assert d == CommandDispatch(
            id=req.id,
            device_id=req.device_id,
            command=req.command,
            params=req.params,
            deadline=req.deadline,
        )
    # a dispatch goes out exactly when the command starts processing
    assert len(dispatches) == sum(e.status == "processing" for e in events)
    # nothing is ever emitted after the terminal event
    terminal_at = [i for i, e in enumerate(events) if e.status in TERMINAL]
    if terminal_at:
        assert terminal_at[0] == len(events) - 1


@PROPS
@given(scenarios())
def test_terminal_state_never_changes(scenario: tuple[CommandRequested, list[Op]]) -> None:
    req, ops = scenario
    terminal: CommandState | None = None
    for new, events, dispatch in run(None, req, ops):
        if terminal is not None:
            assert new == terminal
            assert events == []
            assert dispatch is None
        elif new is not None and is_terminal(new):
            terminal = new


@PROPS
@given(scenarios(), st.data())
def test_state_round_trips_and_restored_state_continues_identically(
    scenario: tuple[CommandRequested, list[Op]], data: st.DataObject
) -> None:
    req, ops = scenario
    split = data.draw(st.integers(0, len(ops)), label="crash after step")
    head = run(None, req, ops[:split])
    state = head[-1][0] if head else None

    # every intermediate state round-trips and steps identically once restored
    prev: CommandState | None = None
    for op, (new, _, _) in zip(ops[:split], head, strict=True):
        if prev is not None:
            assert roundtrip(prev) == prev
            assert step(roundtrip(prev), req, op) == step(prev, req, op)
        prev = new

    restored = None if state is None else roundtrip(state)
    assert restored == state
    if state is not None:
        assert msgspec.json.encode(restored) == msgspec.json.encode(state)
    assert run(restored, req, ops[split:]) == run(state, req, ops[split:])
