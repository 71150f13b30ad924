"""No record and no outage of one part stops another: records a stage cannot use are
dead-lettered with a reason and the stage goes on; what the query API publishes survives a
broker it cannot reach (the outbox); the read models can be rebuilt from the log alone."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

import httpx
import msgspec
import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition

from contracts import Groups, Headers, Topics
from contracts.control import CommandRequested, ControlEvent
from projections.alerts import AlertsProjection
from projections.control import ControlProjection
from runtime.db import migrate
from runtime.settings import Settings
from tests.conftest import Components, free_port, wait_for
from tests.e2e.test_alerts import api, rule, send
from tests.e2e.test_control import answer, command, fetch_next, register, settled
from tests.support import drop_database, new_device, reading, stored_count

Record: TypeAlias = ConsumerRecord[bytes, bytes]


# --- Kafka helpers ---------------------------------------------------------------------------


async def _produce(s: Settings, topic: str, records: list[tuple[str, bytes]]) -> list[int]:
    producer = AIOKafkaProducer(**s.kafka_client, acks="all")
    await producer.start()
    try:
        sent = [await producer.send(topic, value, key=key.encode()) for key, value in records]
        return [(await fut).offset for fut in sent]
    finally:
        await producer.stop()


def produce(s: Settings, topic: str, records: list[tuple[str, bytes]]) -> list[int]:
    """Write records straight to a topic, as any Kafka client may; their offsets."""
    return asyncio.run(_produce(s, topic, records))


def header(rec: Record, name: str) -> str | None:
    return next((v.decode() for k, v in rec.headers if k == name), None)


async def _read_all(s: Settings, topic: str) -> list[Record]:
    consumer = AIOKafkaConsumer(**s.kafka_client)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(s.device_topic_partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[Record] = []
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            for recs in (await consumer.getmany(timeout_ms=500)).values():
                out.extend(recs)
        return out
    finally:
        await consumer.stop()


def dead_letters(
    s: Settings, dlq: str, source_topic: str, offsets: set[int], timeout: float = 20
) -> dict[int, Record]:
    """The records of `dlq` that came from these offsets of `source_topic`, once all are there."""

    def found() -> dict[int, Record] | None:
        got = {
            int(header(r, Headers.DLQ_SOURCE_OFFSET) or -1): r
            for r in asyncio.run(_read_all(s, dlq))
            if header(r, Headers.DLQ_SOURCE_TOPIC) == source_topic
        }
        mine = {o: r for o, r in got.items() if o in offsets}
        return mine if set(mine) == offsets else None

    return dict(wait_for(found, timeout, f"dead letters of {source_topic} at {sorted(offsets)}"))


def queued_event(device: str, **params: Any) -> tuple[str, ControlEvent]:
    ident = str(uuid.uuid4())
    now = datetime.now(UTC)
    request = CommandRequested(
        id=ident,
        device_id=device,
        command="charge",
        params=params,
        requested_at=now,
        deadline=now + timedelta(seconds=60),
        requested_by="test",
    )
    return ident, ControlEvent(
        command_id=ident, device_id=device, status="queued", at=now, request=request
    )


def command_row(db: psycopg.Connection, ident: str) -> tuple[Any, ...] | None:
    return db.execute("SELECT status FROM control_commands WHERE id = %s", (ident,)).fetchone()


# --- per-record dead letters -----------------------------------------------------------------


def test_records_a_projection_cannot_use_are_dead_lettered_and_the_rest_flows_on(
    platform: Components, db: psycopg.Connection, site: str, device_key: str
) -> None:
    s = platform.s
    events, valid = s.topic(Topics.CONTROL_EVENTS), s.topic(Topics.TELEMETRY_VALID)
    device = new_device()
    refused_id, refused = queued_event(device, note="bad\u0000thing")  # jsonb refuses NUL
    good_id, good = queued_event(device, power_kw=5)
    nul_reason = {
        "command_id": str(uuid.uuid4()),
        "device_id": device,
        "status": "failed",
        "at": datetime.now(UTC).isoformat(),
        "reason": "bad\u0000thing",
    }
    offsets = produce(
        s,
        events,
        [
            (device, msgspec.json.encode(refused)),
            (device, msgspec.json.encode(nul_reason)),
            (device, msgspec.json.encode(good)),
        ],
    )
    [garbage] = produce(s, valid, [(device, b"not a reading batch")])

    # the stage went on: the good command after both refused records is in the read model
    wait_for(lambda: command_row(db, good_id), 20, "the command after the refused records")
    assert command_row(db, refused_id) is None

    control = dead_letters(s, s.topic(Topics.CONTROL_DLQ), events, set(offsets[:2]))
    pg_refused, undecodable = control[offsets[0]], control[offsets[1]]
    assert "refused by PostgreSQL" in (header(pg_refused, Headers.DLQ_REASON) or "")
    assert "undecodable" in (header(undecodable, Headers.DLQ_REASON) or "")
    for rec in control.values():
        assert header(rec, Headers.DLQ_STAGE) == s.group(Groups.CONTROL_PROJECTOR)
        assert rec.key == device.encode()
    assert pg_refused.value == msgspec.json.encode(refused)  # unchanged, to be redriven

    [telemetry] = dead_letters(s, s.topic(Topics.TELEMETRY_DLQ), valid, {garbage}).values()
    assert header(telemetry, Headers.DLQ_STAGE) == s.group(Groups.TELEMETRY_PROJECTOR)
    assert telemetry.value == b"not a reading batch"

    # and another site's readings are stored as usual
    devices = [new_device() for _ in range(10)]
    batch = [reading(d, site, seq=i) for d in devices for i in range(10)]
    for d in devices:
        r = httpx.post(
            f"{platform.gateway_url}/api/v1/telemetry/batch",
            json={"readings": [b for b in batch if b["device_id"] == d]},
            headers={"Authorization": f"Bearer {device_key}"},
            timeout=10,
        )
        assert r.status_code == 202, r.text
    wait_for(lambda: stored_count(db, devices)[0] == 100, 10, "100 readings of another site")


def test_free_text_with_control_characters_is_refused_at_the_edge(
    platform: Components,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
) -> None:
    s = platform.s
    device = register(platform, db, device_key, site)
    cid = command(platform, tokens["operator"], device)
    wait_for(lambda: fetch_next(platform, device_key, device, wait=1).status_code == 200, 15)

    r = answer(platform, device_key, cid, "failed", "bad\u0000thing")
    assert r.status_code == 422, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    bell = api(
        platform,
        tokens["admin"],
        "POST",
        "/api/v1/alert-rules",
        json={"name": "ring\u0007", "severity": "major", "kind": "offline", "silent_s": 60},
    )
    assert bell.status_code in (400, 422), bell.text

    # a Kafka device's reply with a NUL goes to control.dlq; a good one still finishes it
    results = s.topic(Topics.CONTROL_RESULTS)
    bad = {"id": cid, "device_id": device, "status": "failed", "reason": "bad\u0000thing"}
    good = {"id": cid, "device_id": device, "status": "failed", "reason": "no power"}
    offsets = produce(
        s, results, [(device, msgspec.json.encode(bad)), (device, msgspec.json.encode(good))]
    )
    [refused] = dead_letters(s, s.topic(Topics.CONTROL_DLQ), results, {offsets[0]}).values()
    assert header(refused, Headers.DLQ_STAGE) == s.group(Groups.CONTROLLER)
    done = settled(platform, tokens["viewer"], cid)
    assert (done["status"], done["reason"]) == ("failed", "no power")


# --- the outbox --------------------------------------------------------------------------------


def test_commands_and_rule_deletes_taken_while_the_broker_is_unreachable_happen_once(
    platform: Components,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
) -> None:
    device = register(platform, db, device_key, site)
    deleted = rule(
        platform,
        tokens,
        kind="threshold",
        metric="soc_pct",
        op="lt",
        threshold=20,
        scope={"device_id": device},
    )
    marker = rule(
        platform,
        tokens,
        kind="threshold",
        metric="soc_pct",
        op="lt",
        threshold=10,
        scope={"device_id": device},
    )
    key = f"k-{uuid.uuid4().hex}"

    platform.stop("api")
    platform.start("api", KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}")
    try:
        first = command(platform, tokens["operator"], device, key=key)
        again = command(platform, tokens["operator"], device, key=key)
        assert again == first
        gone = api(platform, tokens["admin"], "DELETE", f"/api/v1/alert-rules/{deleted}")
        assert gone.status_code == 204, gone.text
        pending = db.execute("SELECT count(*) FROM outbox").fetchone()
        assert pending is not None and pending[0] >= 2  # stored, waiting for the broker
    finally:
        platform.stop("api")
        platform.start("api")

    # published once the relay reaches the broker: the command executes once
    delivered = wait_for(
        lambda: (r := fetch_next(platform, device_key, device, wait=1)).status_code == 200 and r,
        30,
        "the command queued while the broker was unreachable",
    )
    assert delivered.json()["id"] == first
    assert fetch_next(platform, device_key, device, wait=1).status_code == 204
    requests = [
        r
        for r in asyncio.run(_read_all(platform.s, platform.s.topic(Topics.CONTROL_COMMANDS)))
        if r.key == device.encode()
    ]
    assert [msgspec.json.decode(r.value or b"")["id"] for r in requests] == [first]

    # and the deleted rule is gone from the alerter: the marker rule alerts, it does not
    wait_for(lambda: db.execute("SELECT count(*) FROM outbox").fetchone() == (0,), 30, "relay")
    send(platform, device_key, device, site, datetime.now(UTC), soc_pct=5)
    wait_for(
        lambda: db.execute("SELECT 1 FROM alerts WHERE rule_id = %s", (marker,)).fetchone(),
        20,
        "the marker rule's alert",
    )
    assert db.execute("SELECT 1 FROM alerts WHERE rule_id = %s", (deleted,)).fetchone() is None


# --- rebuilding the read models from the log ---------------------------------------------------


class _Silent:
    """Live events of a rebuild go nowhere."""

    async def append(self, events: list[tuple[str, Any]]) -> None:
        return None


TABLES: dict[str, str] = {
    "alerts": "SELECT * FROM alerts WHERE device_id = ANY(%s) ORDER BY id",
    "notifications": "SELECT * FROM notifications WHERE device_id = ANY(%s) ORDER BY id",
    "control_commands": (
        "SELECT id, device_id, command, params, status, reason, ttl_s, deadline, requested_by,"
        " history, created_at, updated_at, delivered_at"
        " FROM control_commands WHERE device_id = ANY(%s) ORDER BY id"
    ),
}


async def _rebuild(s: Settings, until: Callable[[], bool]) -> None:
    group = f"rebuild-{uuid.uuid4().hex[:8]}"
    projections: list[AlertsProjection | ControlProjection] = [
        AlertsProjection(s, _Silent(), group=f"{group}.alerts"),  # type: ignore[arg-type]
        ControlProjection(s, _Silent(), group=f"{group}.control"),  # type: ignore[arg-type]
    ]
    tasks = [asyncio.create_task(p.run()) for p in projections]
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while not await asyncio.to_thread(until):
            assert loop.time() < deadline, "the rebuild did not catch up within 60 s"
            assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
            await asyncio.sleep(0.2)
    finally:
        for p in projections:
            p.stopping.set()
        await asyncio.gather(*tasks)


def _ends(s: Settings, topics: list[str]) -> dict[tuple[str, int], int]:
    async def ends() -> dict[tuple[str, int], int]:
        consumer = AIOKafkaConsumer(**s.kafka_client)
        await consumer.start()
        try:
            tps = [TopicPartition(t, p) for t in topics for p in range(s.device_topic_partitions)]
            return {
                (tp.topic, tp.partition): o for tp, o in (await consumer.end_offsets(tps)).items()
            }
        finally:
            await consumer.stop()

    return asyncio.run(ends())


def test_alerts_notifications_and_commands_rebuild_from_their_topics_alone(
    platform: Components,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
) -> None:
    s = platform.s
    # alerts opened, acknowledged, read and cleared
    device = register(platform, db, device_key, site)
    low = rule(
        platform,
        tokens,
        kind="threshold",
        metric="soc_pct",
        op="lt",
        threshold=20,
        scope={"device_id": device},
    )
    now = datetime.now(UTC)
    send(platform, device_key, device, site, now, soc_pct=5)
    alert_id = wait_for(
        lambda: db.execute("SELECT id FROM alerts WHERE rule_id = %s", (low,)).fetchone(), 20
    )[0]
    assert api(platform, tokens["operator"], "POST", f"/api/v1/alerts/{alert_id}/ack").is_success
    [notification] = db.execute(
        "SELECT id FROM notifications WHERE alert_id = %s", (alert_id,)
    ).fetchone() or [None]
    path = f"/api/v1/notifications/{notification}/ack"
    assert api(platform, tokens["operator"], "POST", path).is_success
    send(platform, device_key, device, site, now + timedelta(seconds=1), soc_pct=60)
    wait_for(
        lambda: (
            db.execute("SELECT status FROM alerts WHERE id = %s", (alert_id,)).fetchone()
            == ("cleared",)
        ),
        20,
        "the alert to clear",
    )
    # commands: one delivered over HTTP and answered, one failed, one never taken (timeout)
    answered = command(platform, tokens["operator"], device)
    assert fetch_next(platform, device_key, device).json()["id"] == answered
    assert answer(platform, device_key, answered, "succeeded").status_code == 202
    failed = command(platform, tokens["operator"], device)
    assert fetch_next(platform, device_key, device).json()["id"] == failed
    assert answer(platform, device_key, failed, "failed", "breaker open").status_code == 202
    expired = command(platform, tokens["operator"], device, ttl_s=1)
    for cid in (answered, failed, expired):
        settled(platform, tokens["viewer"], cid)
    wait_for(
        lambda: (
            db.execute(
                "SELECT count(*) FROM control_commands WHERE device_id = %s"
                " AND delivered_at IS NOT NULL",
                (device,),
            ).fetchone()
            == (2,)
        ),
        20,
        "deliveries to show",
    )

    live = {t: db.execute(sql, ([device],)).fetchall() for t, sql in TABLES.items()}
    assert [len(live[t]) for t in TABLES] == [1, 2, 3], live

    fresh = f"{db.info.dbname}_rebuild"
    db.execute(f'CREATE DATABASE "{fresh}"')
    url = s.database_url.rsplit("/", 1)[0] + f"/{fresh}"
    try:
        rebuilt_settings = Settings(database_url=url)
        migrate(rebuilt_settings)
        topics = [s.topic(Topics.ALERTS), s.topic(Topics.CONTROL_EVENTS)]
        ends = _ends(s, topics)

        with psycopg.connect(url, autocommit=True) as rebuilt:

            def caught_up() -> bool:
                rows = rebuilt.execute(
                    "SELECT topic, partition, next_offset FROM projection_offsets"
                ).fetchall()
                at = {(t, p): o for t, p, o in rows}
                return all(at.get(tp, -1) >= end for tp, end in ends.items() if end > 0)

            asyncio.run(_rebuild(rebuilt_settings, caught_up))
            again = {t: rebuilt.execute(sql, ([device],)).fetchall() for t, sql in TABLES.items()}
        for table in TABLES:
            assert again[table] == live[table], table
    finally:
        drop_database(db, fresh)
