"""The fault suite: the whole platform under steady load while, one scenario after another, a
part of it is killed (-9) and restarted, paused past its session timeout and resumed, or has
its disk filled. Each scenario adds a row to the table printed at the end (tests/faults/table.py)
and asserts, over its own fresh site and devices:

- every reading answered 202 is in PostgreSQL exactly once (and every reading the client tried
  was in the end answered 202: it retries as the README says, 429/503/timeouts/connection
  errors, with backoff, after Retry-After, the same body);
- the alerts table holds exactly the alerts the alerter's pure evaluation
  (`microgrid.backtest.Evaluation`) yields over the readings stored, none repeated or missed;
- every command the API answered 202 ends in exactly one terminal state: in the read model
  (one terminal entry in its history) and in the log (`control.events` holds terminal
  transitions of one status only);
- a client following the live stream (filtered to the scenario's site), reconnecting with
  Last-Event-ID whenever the stream ends or is refused, receives every alert, notification and
  command event of the scenario's devices that the events stream holds, in order, each once,
  without an `error` event, and among them every alert and every command's terminal state.

The platform is the suite's own and shares nothing with the stack other tests use: a
single-node broker (`tests/faults/processes.py`: on a tmpfs of its own when the machine allows
an unprivileged mount namespace, so its disk can be filled), PostgreSQL and Redis instances
(`tests/outages.py`), and the components, started once for the module and supervised as
`microgrid run` does (a part that exits by itself is restarted after 1 s, doubling).

Load per scenario: 30 battery devices of a new site, six clients each posting a batch of its
five devices' readings ten times a second (300 readings/s), each batch resent until 202 before
the next (so a device's readings reach the log in order); an operator sending a command (ttl
10 s) every half second; Kafka devices answering every dispatch `succeeded`. The fault comes
once 600 readings are accepted (about 2 s in); the load goes on until 600 readings sent after
recovery are accepted, then stops, and the checks wait (with deadlines) for the platform to
settle.

Recovery time (the table's last column): from the moment the part is started again (the
paused members resumed; the broker, its disk freed, started again) until every path has served
something sent after that moment: a reading the client sent is stored in PostgreSQL, a command
the operator sent has reached its terminal state, and an alert opened by a reading sent is on
the live client's stream. The row's note gives each path's time ("back: ..."); a path the fault
did not touch shows its latency at that moment.
"""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any, TypeVar

import httpx
import msgspec
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from redis import Redis

from contracts import Events, Reading, Streams, Topics
from contracts.alerting import AlertRuleSpec
from contracts.control import TERMINAL, ControlEvent
from microgrid.backtest import Evaluation
from runtime.db import migrate
from runtime.kafka import ensure_topics
from runtime.kafka_access import ensure_access
from runtime.keys import create_key
from runtime.settings import Settings
from tests.conftest import free_port, wait_for
from tests.faults import table
from tests.faults.clients import (
    Commands,
    Db,
    LiveClient,
    Load,
    Responder,
    identity,
    unless_away,
)
from tests.faults.processes import Parts, PrivateBroker, adopt_orphans, family, kill_all
from tests.outages import PrivatePostgres, PrivateRedis

T = TypeVar("T")
COMPONENTS = ("gateway", "api", "validator", "projector", "alerter", "controller")
LIVE_EVENTS = (
    Events.ALERT_OPENED,
    Events.ALERT_CLEARED,
    Events.NOTIFICATION_CREATED,
    Events.CONTROL_UPDATED,
)
# What each consumer group's member logs when it is given partitions.
ASSIGNED = {
    "validator": ("assigned to partitions",),
    "alerter": ("restored state",),
    "controller": ("restored state",),
    "projector": tuple(f"{p}: assigned partitions" for p in ("telemetry", "alerts", "control")),
}
PORTS = {
    "validator": "VALIDATOR_METRICS_PORT",
    "alerter": "ALERTER_METRICS_PORT",
    "controller": "CONTROLLER_METRICS_PORT",
    "projector": "PROJECTOR_METRICS_PORT",
}


def until(check: Callable[[], T], timeout: float) -> T:
    """Call `check` until it answers something true or the time is up; its last answer."""
    deadline = time.monotonic() + timeout
    while True:
        last = check()
        if last or time.monotonic() > deadline:
            return last
        time.sleep(0.2)


@dataclass
class Platform:
    s: Settings
    parts: Parts
    broker: PrivateBroker
    pg: PrivatePostgres
    redis: PrivateRedis
    db: Db
    tokens: dict[str, str]
    rule_id: str
    rule: AlertRuleSpec
    responder: Responder

    @property
    def gateway(self) -> str:
        return f"http://127.0.0.1:{self.s.gateway_port}"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.s.api_port}"


def markers(parts: Parts, alias: str) -> dict[str, int]:
    """How often the member logged each of its group's assignment markers."""
    return {m: parts.count(alias, m) for m in ASSIGNED[alias.split("-")[0]]}


def assigned_since(parts: Parts, alias: str, seen: dict[str, int]) -> bool:
    """The member was given partitions (in each of its groups) since `seen` was taken."""
    return all(n > seen.get(m, 0) for m, n in markers(parts, alias).items())


def login(api: str, username: str, password: str) -> str:
    r = httpx.post(
        f"{api}/api/v1/auth/login", json={"username": username, "password": password}, timeout=30
    )
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


def credentials(s: Settings, role: str) -> tuple[str, str]:
    return getattr(s, f"auth_{role}_username"), getattr(s, f"auth_{role}_password")


def settings_for(broker: PrivateBroker, pg: PrivatePostgres, redis: PrivateRedis) -> Settings:
    return broker.settings.model_copy(
        update={
            "environment": "test",
            "database_url": pg.url,
            "redis_url": redis.url,
            "kafka_namespace": "faults.",
            "device_topic_partitions": 4,
            "gateway_port": free_port(),
            "api_port": free_port(),
            **{port.lower(): free_port() for port in PORTS.values()},
        }
    )


def environment(s: Settings) -> dict[str, str]:
    """What the components are started with (the settings above)."""
    return {
        "ENVIRONMENT": "test",
        "KAFKA_BOOTSTRAP_SERVERS": s.kafka_bootstrap_servers,
        "KAFKA_TLS": "false",
        "DATABASE_URL": s.database_url,
        "REDIS_URL": s.redis_url,
        "KAFKA_NAMESPACE": s.kafka_namespace,
        "DEVICE_TOPIC_PARTITIONS": str(s.device_topic_partitions),
        "GATEWAY_PORT": str(s.gateway_port),
        "API_PORT": str(s.api_port),
        **{port: str(getattr(s, port.lower())) for port in PORTS.values()},
    }


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    adopt_orphans()
    teardown: list[Callable[[], object]] = [partial(adopt_orphans, False)]
    try:
        broker = PrivateBroker()
        teardown.append(broker.remove)
        pg = PrivatePostgres()
        teardown.append(pg.remove)
        redis = PrivateRedis()
        teardown.append(redis.remove)
        with ThreadPoolExecutor(3) as pool:
            for started in [pool.submit(broker.up), pool.submit(pg.up), pool.submit(redis.up)]:
                started.result()
        s = settings_for(broker, pg, redis)
        migrate(s)
        asyncio.run(ensure_topics(s))
        ensure_access(s)
        parts = Parts(environment(s), tmp_path_factory.mktemp("faults"))
        teardown.append(parts.stop_all)
        # the gateway and the API first, each until it answers: uvicorn kills a worker that does
        # not answer its health check within 5 s, and with every component importing at once a
        # gateway worker's imports took longer, again and again
        for name in COMPONENTS:
            parts.start(name)
            if name in ("gateway", "api"):
                url = f"http://127.0.0.1:{getattr(s, f'{name}_port')}"
                wait_for(partial(parts.healthy, url), 120, f"{url}/healthz")
        for name in ASSIGNED:
            wait_for(partial(assigned_since, parts, name, {}), 120, f"{name} to get partitions")
        api = f"http://127.0.0.1:{s.api_port}"
        tokens = {
            role: login(api, *credentials(s, role)) for role in ("admin", "operator", "viewer")
        }
        rule_id, rule = hot_rule(parts, api, tokens["admin"])
        responder = Responder(s)
        responder.start()
        teardown.append(responder.stop)
        assert responder.ready.wait(60), "the Kafka devices did not join their group"
        yield Platform(s, parts, broker, pg, redis, Db(pg.url), tokens, rule_id, rule, responder)
    finally:
        failures = []
        for step in reversed(teardown):  # each, whatever the others do
            try:
                step()
            except Exception as exc:
                failures.append(exc)
        if failures:
            raise failures[0]


def hot_rule(parts: Parts, api: str, token: str) -> tuple[str, AlertRuleSpec]:
    """The platform's one rule (the default rules are deleted): temperature over 60 °C,
    clearing under 55 °C; once the alerter has it."""
    admin = {"Authorization": f"Bearer {token}"}
    rules = httpx.get(f"{api}/api/v1/alert-rules", headers=admin, timeout=10).json()["items"]
    for old in rules:
        r = httpx.delete(f"{api}/api/v1/alert-rules/{old['id']}", headers=admin, timeout=30)
        assert r.status_code == 204, r.text
    body = {
        "name": "hot",
        "severity": "major",
        "kind": "threshold",
        "metric": "temperature_c",
        "op": "gt",
        "threshold": 60,
        "clear_threshold": 55,
    }
    r = httpx.post(f"{api}/api/v1/alert-rules", json=body, headers=admin, timeout=30)
    assert r.status_code == 201, r.text
    rule_id = str(r.json()["id"])
    wait_for(lambda: parts.count("alerter", f"rule {rule_id} (") > 0, 60, "the alerter's rule")
    return rule_id, msgspec.convert(r.json(), AlertRuleSpec)


# --- scenarios ---------------------------------------------------------------------------------


@dataclass
class Run:
    """One scenario's site, devices and clients."""

    name: str
    site: str
    devices: list[str]
    load: Load
    live: LiveClient
    commands: Commands | None = None
    notes: list[str] = field(default_factory=list)


Fault = Callable[[Platform, Run], float]  # injects the fault; returns when the part restarted


def kill_and_restart(part: str) -> Fault:
    def fault(p: Platform, run: Run) -> float:
        p.parts.kill(part)
        restarted = time.monotonic()
        p.parts.start(part)
        return restarted

    return fault


def kill_postgres(p: Platform, run: Run) -> float:
    postmaster = int((p.pg.data / "postmaster.pid").read_text().split()[0])
    kill_all(family(postmaster))
    restarted = time.monotonic()
    p.pg.start()
    return restarted


def kill_redis(p: Platform, run: Run) -> float:
    proc = p.redis.proc
    assert proc is not None
    proc.kill()
    proc.wait()
    restarted = time.monotonic()
    p.redis.up()
    return restarted


def kill_broker(p: Platform, run: Run) -> float:
    p.broker.kill()
    restarted = time.monotonic()
    p.broker.up()
    return restarted


def fill_broker_disk(p: Platform, run: Run) -> float:
    filled = time.monotonic()
    written = p.broker.fill()
    halted = p.broker.wait_down(60)
    run.notes.append(
        f"disk filled ({written >> 20} MiB more); the broker "
        + (f"halted after {time.monotonic() - filled:.1f} s" if halted else "kept running")
    )
    p.broker.free()
    if not halted:
        p.broker.kill()
    restarted = time.monotonic()
    p.broker.up()
    return restarted


def add_members(p: Platform) -> None:
    """A second member in each consumer group, once each has partitions."""
    seen = {name: markers(p.parts, f"{name}-2") for name in PORTS}
    for name, port in PORTS.items():
        p.parts.start(name, f"{name}-2", **{port: str(free_port())})
    for name in PORTS:
        alias = f"{name}-2"
        wait_for(partial(assigned_since, p.parts, alias, seen[name]), 90, f"{alias} to join")


def pause_members(p: Platform, run: Run) -> float:
    """SIGSTOP the second members until the first ones have their partitions (past the
    session timeout), then SIGCONT: each wakes up with whatever it had in hand."""
    firsts = {name: markers(p.parts, name) for name in PORTS}
    for name in PORTS:
        p.parts.signal(f"{name}-2", signal.SIGSTOP)
    paused = time.monotonic()
    try:
        for name in PORTS:
            took_over = partial(assigned_since, p.parts, name, firsts[name])
            wait_for(took_over, 90, f"{name} to take the paused member's partitions")
        run.notes.append(f"paused {time.monotonic() - paused:.1f} s, until taken over")
    finally:
        resumed = time.monotonic()
        for name in PORTS:
            p.parts.signal(f"{name}-2", signal.SIGCONT)
    return resumed


# What a member resumed after its successor took over logs when the platform refuses its work.
REFUSALS = {
    "transaction fenced": "ProducerFenced",  # alerter, controller: the successor's producer
    "commit refused": "CommitFailedError",  # validator: its offsets, after it re-emitted
    "positions fenced": "was projected by another consumer",  # projector: PostgreSQL positions
}


def remove_members(p: Platform, run: Run) -> None:
    """Stop the second members (under load), noting how the resumed ones were refused."""
    seen = [
        what
        for what, text in REFUSALS.items()
        if any(p.parts.count(f"{name}-2", text) for name in PORTS)
    ]
    run.notes.append(f"resumed members refused: {', '.join(seen) or 'nothing'}")
    p.parts.stop(*(f"{name}-2" for name in PORTS))


@dataclass(frozen=True)
class Scenario:
    name: str
    fault: Fault
    before: Callable[[Platform], None] | None = None
    after: Callable[[Platform, Run], None] | None = None  # while the load still runs


SCENARIOS = [
    Scenario("kill -9 validator", kill_and_restart("validator")),
    Scenario("kill -9 alerter", kill_and_restart("alerter")),
    Scenario("kill -9 controller", kill_and_restart("controller")),
    Scenario("kill -9 projector", kill_and_restart("projector")),
    Scenario("kill -9 gateway", kill_and_restart("gateway")),
    Scenario("kill -9 api", kill_and_restart("api")),
    Scenario("kill -9 postgres", kill_postgres),
    Scenario("kill -9 redis", kill_redis),
    Scenario("SIGSTOP members past session", pause_members, add_members, remove_members),
    Scenario("kill -9 broker", kill_broker),
    Scenario("broker disk full", fill_broker_disk),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
def test_fault(platform: Platform, scenario: Scenario) -> None:
    p, tag = platform, uuid.uuid4().hex[:6]
    if scenario.fault is fill_broker_disk and p.broker.unconfined:
        table.skipped(scenario.name, p.broker.unconfined)
        pytest.skip(p.broker.unconfined)
    site = f"faults-{tag}"
    with psycopg.connect(p.pg.url, autocommit=True) as conn:
        key = create_key(conn, site)
    devices = [f"f{tag}-{i:02d}" for i in range(30)]
    p.responder.devices.update(devices)
    exits, rows = len(p.parts.exited), len(table.ROWS)
    load = Load(f"{p.gateway}/api/v1/telemetry/batch", key, site, devices)
    live: LiveClient | None = None
    try:
        if scenario.before is not None:
            scenario.before(p)
        live = LiveClient(
            f"{p.api}/api/v1/stream",
            p.tokens["viewer"],
            {"site_id": site, "event": ",".join(LIVE_EVENTS)},
        )
        run = Run(scenario.name, site, devices, load, live)
        recovery = drive(p, run, scenario)
        problems = verify(p, run, recovery, p.parts.exited[exits:])
    except BaseException as exc:
        if len(table.ROWS) == rows:  # the scenario's row, with what is known
            found = unless_away(partial(stored_rows, p, devices))() or []
            record(scenario.name, load, None, found, [f"failed: {exc!r}"[:300]])
        raise
    finally:
        if live is not None:
            live.close()
    assert not problems, "\n".join(problems)


def drive(p: Platform, run: Run, scenario: Scenario) -> float:
    """Load, commands, the fault a few seconds in, and load until well after recovery; the
    recovery time."""
    load = run.load
    load.start()
    try:
        wait_for(lambda: load.accepted_count() >= 300, 60, "the load under way")
        wait_for(unless_away(partial(registered, p, run.devices)), 30, "the devices registered")
        run.commands = Commands(p.api, p.tokens["operator"], run.devices)
        run.commands.start()
        wait_for(lambda: load.accepted_count() >= 600, 60, "600 readings accepted")
        restarted = scenario.fault(p, run)
        wall = datetime.now(UTC) - timedelta(seconds=time.monotonic() - restarted)
        paths = recover(p, run, restarted, wall)
        run.notes.append(
            "back: " + ", ".join(f"{path} {took:.1f} s" for path, took in paths.items())
        )
        recovery = max(paths.values())
        recovered = time.monotonic()
        wait_for(lambda: load.accepted_count(since=recovered) >= 600, 60, "load after recovery")
        if scenario.after is not None:
            scenario.after(p, run)
        return recovery
    finally:
        if run.commands is not None:
            run.commands.stop()
        load.stop()


def recover(p: Platform, run: Run, restarted: float, wall: datetime) -> dict[str, float]:
    """Seconds from the restart until each path served something sent after it: a reading
    stored, a command finished, an alert opened by a reading seen on the live stream."""
    load, commands, live = run.load, run.commands, run.live
    assert commands is not None

    def reading() -> bool:
        first = load.first_after(restarted)
        return first is not None and stored(p, *identity(first.readings[0]))

    def command() -> bool:
        first = next((cid for tried, cid in list(commands.sent) if tried >= restarted), None)
        return first is not None and finished(p, first)

    def alert() -> float | None:
        return next(
            (
                e.received
                for e in list(live.events)
                if e.event == Events.ALERT_OPENED
                and datetime.fromisoformat(e.data["opened_at"]) >= wall
            ),
            None,
        )

    took: dict[str, float] = {}
    deadline = time.monotonic() + 150
    while len(took) < 3:
        now = time.monotonic()
        if "readings" not in took and unless_away(reading)():
            took["readings"] = now - restarted
        if "commands" not in took and unless_away(command)():
            took["commands"] = now - restarted
        if "live alerts" not in took and (seen := alert()) is not None:
            took["live alerts"] = seen - restarted
        assert now < deadline, f"not recovered within 150 s: only {took}"
        time.sleep(0.1)
    return took


def finished(p: Platform, command: str) -> bool:
    rows = p.db.rows("SELECT status FROM control_commands WHERE id::text = %s", (command,))
    return bool(rows) and rows[0][0] in TERMINAL


def registered(p: Platform, devices: list[str]) -> bool:
    rows = p.db.rows("SELECT count(*) FROM devices WHERE device_id = ANY(%s)", (devices,))
    return bool(rows[0][0] == len(devices))


def stored(p: Platform, device: str, ts: datetime) -> bool:
    rows = p.db.rows(
        "SELECT 1 FROM telemetry_readings WHERE device_id = %s AND ts = %s", (device, ts)
    )
    return bool(rows)


def stored_rows(p: Platform, devices: list[str]) -> list[tuple[Any, ...]]:
    return p.db.rows(
        "SELECT device_id, ts FROM telemetry_readings WHERE device_id = ANY(%s)", (devices,)
    )


def record(
    scenario: str,
    load: Load,
    recovery: float | None,
    found: list[tuple[Any, ...]],
    notes: list[str],
) -> None:
    accepted = {identity(r) for r in load.readings(accepted_only=True)}
    ids = {(d, t) for d, t in found}
    table.record(
        table.Row(
            scenario=scenario,
            sent=len(load.readings()),
            accepted=len(accepted),
            stored=len(accepted & ids),
            duplicates=len(found) - len(ids),
            lost=len(accepted - ids),
            recovery_s=recovery,
            note="; ".join(notes),
        )
    )


# --- checks ------------------------------------------------------------------------------------


def verify(
    p: Platform, run: Run, recovery: float, exits: list[tuple[str, int | None]]
) -> list[str]:
    """Wait for the platform to settle, record the scenario's row, and return what is wrong."""
    load, problems = run.load, []
    sent = load.readings()
    accepted = {identity(r) for r in load.readings(accepted_only=True)}

    def all_stored() -> list[tuple[Any, ...]]:
        found = stored_rows(p, run.devices)
        return found if accepted <= {(d, t) for d, t in found} else []

    found = (
        until(unless_away(all_stored), 90) or unless_away(partial(stored_rows, p, run.devices))()
    )
    found = found or []
    ids = {(d, t) for d, t in found}
    if load.unexpected:
        problems.append(f"answers a client should not get: {load.unexpected[:3]}")
    if len(accepted) != len(sent):
        problems.append(f"{len(sent) - len(accepted)} readings never answered 202")
    if not accepted <= ids:
        problems.append(f"{len(accepted - ids)} readings answered 202 are not stored")
    if len(found) != len(ids):
        problems.append(f"{len(found) - len(ids)} readings stored more than once")
    if not ids <= {identity(r) for r in sent}:
        problems.append("readings stored that nobody sent")

    notes = list(run.notes)
    alerts = check(problems, "alerts", partial(same_alerts_as_the_pure_evaluation, p, run, ids))
    commands = check(problems, "commands", partial(each_command_ends_once, p, run))
    events = check(
        problems,
        "live stream",
        partial(live_stream_without_gaps, p, run, alerts or set(), commands or {}),
    )
    if alerts is not None:
        notes.append(f"{len(alerts)} alerts, as evaluated")
    if commands is not None:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(Counter(commands.values()).items()))
        notes.append(f"{len(commands)} commands, each terminal once ({outcomes})")
    if events is not None:
        notes.append(f"{events} live events over {run.live.connections} connection(s)")
    answers = ", ".join(f"{k}: {v}" for k, v in sorted(load.answers.items()))
    notes.append(f"{load.retries} resends (answers {answers})")
    if exits:
        notes.append("exited by itself: " + ", ".join(f"{a} ({c})" for a, c in exits))
    record(run.name, load, recovery, found, notes)
    return problems


def check(problems: list[str], what: str, step: Callable[[], T]) -> T | None:
    try:
        return step()
    except Exception as exc:  # recorded in the row's scenario; the test fails on it
        problems.append(
            f"{what}: {exc!r}" if not isinstance(exc, AssertionError) else f"{what}: {exc}"
        )
        return None


def same_alerts_as_the_pure_evaluation(
    p: Platform, run: Run, stored_ids: set[tuple[str, datetime]]
) -> set[tuple[Any, ...]]:
    """The alerts table holds exactly the alerts the alerter's pure evaluation gives for the
    readings in the log (those stored), each device's in the order it sent them."""
    readings = [r for r in run.load.readings() if identity(r) in stored_ids]
    start = min(datetime.fromisoformat(r["ts"]) for r in readings)
    evaluation = Evaluation(p.rule_id, p.rule, start, datetime.now(UTC), run.site)
    for r in readings:
        evaluation.reading(msgspec.convert(r, Reading))
    expected = {(e.alert_id, e.device_id, e.opened_at, e.cleared_at) for e in evaluation.finish()}
    assert len(expected) >= len(run.devices), f"only {len(expected)} alerts: too few to tell"

    def live() -> set[tuple[Any, ...]]:
        found = p.db.rows(
            "SELECT id, device_id, opened_at, cleared_at FROM alerts"
            " WHERE rule_id = %s AND device_id = ANY(%s)",
            (p.rule_id, run.devices),
        )
        return {(i, d, o.astimezone(UTC), c and c.astimezone(UTC)) for i, d, o, c in found}

    got = until(unless_away(lambda: (a := live()) == expected and a), 60) or live()
    missing, extra = expected - got, got - expected
    assert not missing and not extra, (
        f"{len(missing)} missing ({sorted(missing)[:2]}), {len(extra)} extra ({sorted(extra)[:2]})"
    )
    return expected


def each_command_ends_once(p: Platform, run: Run) -> dict[str, str]:
    """Every command the API accepted ends in exactly one terminal state, in the read model
    and in the log; {command id: that state}."""
    assert run.commands is not None
    ids = run.commands.ids
    assert not run.commands.unexpected, run.commands.unexpected[:3]
    assert len(ids) >= 3, f"only {len(ids)} commands accepted"

    def done() -> list[tuple[Any, ...]]:
        found = p.db.rows(
            "SELECT id::text, status, history FROM control_commands WHERE id::text = ANY(%s)",
            (ids,),
        )
        return found if len(found) == len(ids) and all(r[1] in TERMINAL for r in found) else []

    rows = until(unless_away(done), 60)
    assert rows, "not every command reached a terminal state"
    in_log = asyncio.run(terminal_transitions(p.s, set(ids)))
    outcome = {}
    for cid, status, history in rows:
        ends = [h["status"] for h in history if h["status"] in TERMINAL]
        assert ends == [status] and history[-1]["status"] == status, (cid, history)
        assert in_log.get(cid) == {status}, (cid, status, in_log.get(cid))
        outcome[cid] = status
    return outcome


async def terminal_transitions(s: Settings, ids: set[str]) -> dict[str, set[str]]:
    """The terminal statuses `control.events` holds for these commands (committed records)."""
    topic = s.topic(Topics.CONTROL_EVENTS)
    consumer = AIOKafkaConsumer(
        **s.kafka_client, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, i) for i in range(s.device_topic_partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        out: dict[str, set[str]] = {}
        decode = msgspec.json.Decoder(ControlEvent).decode
        while [tp for tp in partitions if await consumer.position(tp) < ends[tp]]:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for rec in records:
                    e = decode(rec.value or b"")
                    if e.command_id in ids and e.status in TERMINAL:
                        out.setdefault(e.command_id, set()).add(e.status)
        return out
    finally:
        await consumer.stop()


def live_stream_without_gaps(
    p: Platform, run: Run, alerts: set[tuple[Any, ...]], commands: dict[str, str]
) -> int:
    """The live client received every event of the scenario's devices that the events stream
    holds after the position it first connected at, in order, each once, and no error event;
    among them every alert's opening and clearing and every command's terminal state."""
    live, devices = run.live, set(run.devices)
    opened = {a[0] for a in alerts}
    cleared = {a[0] for a in alerts if a[3] is not None}
    wanted = {e.encode() for e in LIVE_EVENTS}
    redis = Redis.from_url(p.redis.url)

    def in_stream() -> list[str]:
        entries: Any = redis.xrange(p.s.topic(Streams.EVENTS), min=f"({live.opened_at}")
        return [
            entry_id.decode()
            for entry_id, f in entries
            if f[b"event"] in wanted and msgspec.json.decode(f[b"data"])["device_id"] in devices
        ]

    def received() -> list[str]:
        return [e.id for e in list(live.events) if e.event in LIVE_EVENTS]

    def complete() -> bool:
        seen = {(e.event, e.data.get("id")) for e in list(live.events)}
        ended = {
            (e.data.get("id"), e.data.get("status"))
            for e in list(live.events)
            if e.event == Events.CONTROL_UPDATED
        }
        return (
            all((Events.ALERT_OPENED, a) in seen for a in opened)
            and all((Events.ALERT_CLEARED, a) in seen for a in cleared)
            and all(c in ended for c in commands.items())
        )

    try:
        until(lambda: complete() and received() == in_stream(), 60)
        stream, got = in_stream(), received()
    finally:
        redis.close()
    errors = [e for e in live.events if e.event == "error"]
    assert not errors, errors[:3]
    assert complete(), "the live client lacks alerts or commands' outcomes"
    missing = len(set(stream) - set(got))
    assert got == stream, f"{missing} events missing, {len(got) - len(set(got))} repeated"
    return len(got)
