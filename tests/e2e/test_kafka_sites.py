"""Sites whose devices have Kafka clients: `keys create --site S --kafka` gives a principal that
may use only its site's topics, the validator takes the site from the topic, and commands go
out on the site's dispatch topic and come back on its results topic."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any, Literal

import msgspec
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import GroupAuthorizationFailedError, TopicAuthorizationFailedError

from contracts import Groups, Headers, Topics
from contracts.control import CommandDispatch, CommandResult
from contracts.topics import site_group_prefix, site_topic
from runtime.settings import Settings
from tests.conftest import Components, wait_for
from tests.e2e.test_control import command, detail, settled
from tests.e2e.test_ingest_kafka import dead_letters
from tests.e2e.test_kafka_access import (
    assert_refused_for,
    consume,
    produce,
    refusal,
    refused,
)
from tests.support import microgrid_cli, new_device, reading


def new_principal(stack: Settings, site: str) -> Settings:
    """`microgrid keys create --site SITE --kafka`, as settings connecting as that principal."""
    done = microgrid_cli("keys", "create", "--site", site, "--kafka")
    assert done.returncode == 0, done.stderr
    config = dict(
        line.split("=", 1) for line in done.stdout.splitlines() if line and line[0] != "#"
    )
    assert config["security.protocol"] == "SASL_PLAINTEXT"
    assert config["sasl.mechanisms"] == "SCRAM-SHA-512"
    return stack.model_copy(
        update={
            "kafka_username": config["sasl.username"],
            "kafka_password": config["sasl.password"],
        }
    )


@pytest.fixture(scope="module")
def sites(stack: Settings) -> dict[str, Settings]:
    """Two sites with topics of their own, each with a principal."""
    return {name: new_principal(stack, f"ks{name}-{uuid.uuid4().hex[:6]}") for name in "AB"}


def site_of(s: Settings) -> str:
    # microgrid-site-<site>-<8 hex>
    return s.kafka_username.removeprefix(s.kafka_principal_prefix + "site-")[:-9]


def test_site_ids_that_cannot_name_topics_are_refused(stack: Settings) -> None:
    for bad in ("a.b", "plant:7"):
        done = microgrid_cli("keys", "create", "--site", bad, "--kafka")
        assert done.returncode != 0
        assert "cannot name Kafka topics" in done.stderr
        assert "sasl.password" not in done.stdout


def test_a_site_principal_writes_only_its_own_topics(
    stack: Settings, sites: dict[str, Settings]
) -> None:
    a, b = sites["A"], sites["B"]
    own, other = site_of(a), site_of(b)
    allowed = [site_topic(own, "telemetry"), site_topic(own, "results")]
    refused_topics = [
        site_topic(own, "dispatch"),
        site_topic(other, "telemetry"),
        site_topic(other, "results"),
        Topics.TELEMETRY_RAW,
        Topics.TELEMETRY_VALID,
        Topics.ALERT_RULES,
        Topics.CONTROL_RESULTS,
        Topics.CONTROL_COMMANDS,
        Topics.CONTROL_EVENTS,
    ]
    for topic in allowed:
        assert asyncio.run(refused(produce(a, topic))) is None, topic
    for topic in refused_topics:
        assert asyncio.run(refused(produce(a, topic))) is TopicAuthorizationFailedError, topic


def test_a_site_principal_reads_only_its_own_dispatch(
    stack: Settings, sites: dict[str, Settings]
) -> None:
    a, b = sites["A"], sites["B"]
    own, other = site_of(a), site_of(b)
    group = site_group_prefix(own) + "devices"
    assert asyncio.run(refused(consume(a, site_topic(own, "dispatch"), group))) is None
    cases = [
        (
            site_topic(other, "dispatch"),
            site_group_prefix(own) + "x",
            TopicAuthorizationFailedError,
        ),
        (site_topic(own, "telemetry"), None, TopicAuthorizationFailedError),
        (Topics.CONTROL_DISPATCH, None, TopicAuthorizationFailedError),
        (
            site_topic(own, "dispatch"),
            site_group_prefix(other) + "x",
            GroupAuthorizationFailedError,
        ),
        (site_topic(own, "dispatch"), Groups.SIMULATOR + ".x", GroupAuthorizationFailedError),
    ]
    for topic, grp, error in cases:
        assert asyncio.run(refused(consume(a, topic, grp))) is error, (topic, grp)


async def send(s: Settings, topic: str, records: Sequence[tuple[bytes | None, bytes]]) -> None:
    producer = AIOKafkaProducer(**s.kafka_client, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(s.topic(topic), value, key=key)
    finally:
        await producer.stop()


def stored_site(db: psycopg.Connection, device: str) -> Any:
    row = db.execute("SELECT site_id FROM devices WHERE device_id = %s", (device,)).fetchone()
    return None if row is None else row[0]


def reason(record: ConsumerRecord[bytes, bytes]) -> str:
    return dict(record.headers)[Headers.DLQ_REASON].decode()


def test_readings_on_a_site_topic_belong_to_that_site(
    platform: Components, db: psycopg.Connection, sites: dict[str, Settings]
) -> None:
    a, b = sites["A"], sites["B"]
    own, other = site_of(a), site_of(b)
    theirs = new_device()  # a device of site B, registered by its first reading on B's topic
    asyncio.run(
        send(
            b,
            site_topic(other, "telemetry"),
            [(theirs.encode(), json.dumps(reading(theirs, other)).encode())],
        )
    )
    wait_for(lambda: stored_site(db, theirs) == other, 60, "site B's device stored")

    mine, stray = new_device(), new_device()
    records = [
        # a reading naming another site than the topic's
        (stray.encode(), json.dumps(reading(stray, other)).encode()),
        # a reading for B's device, claimed for site A on A's topic
        (theirs.encode(), json.dumps(reading(theirs, own, seq=1)).encode()),
        # then the site's own device: stored, the marker that the two above were seen
        (mine.encode(), json.dumps(reading(mine, own)).encode()),
    ]
    asyncio.run(send(a, site_topic(own, "telemetry"), records))
    wait_for(lambda: stored_site(db, mine) == own, 60, "site A's device stored")
    source = site_topic(own, "telemetry")
    (foreign_site,) = asyncio.run(dead_letters(platform.s, stray.encode(), 1, source=source))
    (foreign_device,) = asyncio.run(dead_letters(platform.s, theirs.encode(), 1, source=source))
    assert [foreign_site.value, foreign_device.value] == [records[0][1], records[1][1]]
    assert f"on the topic of site {own!r}" in reason(foreign_site)
    assert f"device {theirs!r} belongs to another site" in reason(foreign_device)
    assert stored_site(db, stray) is None
    rows = db.execute(
        "SELECT count(*) FROM telemetry_readings WHERE device_id = %s", (theirs,)
    ).fetchone()
    assert rows == (1,)  # only its own site's reading


def dispatch_of(value: bytes | None) -> CommandDispatch | None:
    """A dispatch, or None for anything else a device finds on its topic (and ignores)."""
    try:
        return msgspec.json.decode(value or b"", type=CommandDispatch)
    except msgspec.DecodeError:
        return None


async def act_as_devices(
    s: Settings,
    site: str,
    answers: dict[str, Literal["succeeded", "failed"]],
    seen: list[CommandDispatch],
    ready: threading.Event,
    stop: threading.Event,
) -> None:
    """Consume the site's dispatch in a group of the site's, and answer each dispatch to a
    device of `answers` with that status on the site's results topic."""
    consumer = AIOKafkaConsumer(
        s.topic(site_topic(site, "dispatch")),
        **s.kafka_client,
        group_id=s.group(site_group_prefix(site) + uuid.uuid4().hex[:6]),
        auto_offset_reset="earliest",
    )
    producer = AIOKafkaProducer(**s.kafka_client, acks="all")
    await consumer.start()
    await producer.start()
    ready.set()
    try:
        while not stop.is_set():
            for recs in (await consumer.getmany(timeout_ms=200)).values():
                for rec in recs:
                    d = dispatch_of(rec.value)
                    if d is None:
                        continue
                    seen.append(d)
                    if d.device_id in answers:
                        status = answers[d.device_id]
                        reply = CommandResult(id=d.id, device_id=d.device_id, status=status)
                        await producer.send_and_wait(
                            s.topic(site_topic(site, "results")),
                            msgspec.json.encode(reply),
                            key=d.device_id.encode(),
                        )
    finally:
        await consumer.stop()
        await producer.stop()


def test_commands_go_out_and_come_back_on_the_site_topics(
    platform: Components,
    tokens: dict[str, str],
    db: psycopg.Connection,
    sites: dict[str, Settings],
) -> None:
    a, b = sites["A"], sites["B"]
    own, other = site_of(a), site_of(b)
    mine, theirs = new_device(), new_device()
    for s, site, device in ((a, own, mine), (b, other, theirs)):
        value = json.dumps(reading(device, site)).encode()
        asyncio.run(send(s, site_topic(site, "telemetry"), [(device.encode(), value)]))
    wait_for(
        lambda: (stored_site(db, mine), stored_site(db, theirs)) == (own, other),
        60,
        "devices stored",
    )

    ready, stop, seen = threading.Event(), threading.Event(), []  # type: ignore[var-annotated]
    worker = threading.Thread(
        target=lambda: asyncio.run(act_as_devices(a, own, {mine: "succeeded"}, seen, ready, stop))
    )
    worker.start()
    try:
        assert ready.wait(30)
        cid = command(platform, tokens["operator"], mine)
        assert settled(platform, tokens["viewer"], cid, timeout=60)["status"] == "succeeded"
        assert [d.id for d in seen] == [cid]

        # B's command goes out on B's topic; a reply for it forged on A's results topic is
        # dead-lettered and changes nothing
        cid_b = command(platform, tokens["operator"], theirs)
        wait_for(
            lambda: detail(platform, tokens["viewer"], cid_b)["status"] == "processing",
            30,
            "site B's command dispatched",
        )
        forged = CommandResult(id=cid_b, device_id=theirs, status="succeeded")
        nobody = new_device()  # and a reply from a device nobody registered
        stray = CommandResult(id=cid_b, device_id=nobody, status="succeeded")
        asyncio.run(
            send(
                a,
                site_topic(own, "results"),
                [
                    (theirs.encode(), msgspec.json.encode(forged)),
                    (nobody.encode(), msgspec.json.encode(stray)),
                ],
            )
        )
        letters = asyncio.run(
            dead_letters(
                platform.s,
                theirs.encode(),
                1,
                topic=Topics.CONTROL_DLQ,
                source=site_topic(own, "results"),
            )
        )
        assert f"device {theirs!r} belongs to another site" in reason(letters[0])
        (unknown,) = asyncio.run(
            dead_letters(
                platform.s,
                nobody.encode(),
                1,
                topic=Topics.CONTROL_DLQ,
                source=site_topic(own, "results"),
            )
        )
        assert f"device {nobody!r} is not registered" in reason(unknown)
        assert detail(platform, tokens["viewer"], cid_b)["status"] == "processing"
    finally:
        stop.set()
        worker.join()
    assert cid_b not in [d.id for d in seen]
    theirs_seen: list[CommandDispatch] = []
    asyncio.run(_dispatches_of(b, other, cid_b, theirs_seen))
    assert [d.device_id for d in theirs_seen] == [theirs]


async def _dispatches_of(s: Settings, site: str, cid: str, out: list[CommandDispatch]) -> None:
    consumer = AIOKafkaConsumer(
        s.topic(site_topic(site, "dispatch")),
        **s.kafka_client,
        group_id=s.group(site_group_prefix(site) + uuid.uuid4().hex[:6]),
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + 30
        while not out and time.monotonic() < deadline:
            for recs in (await consumer.getmany(timeout_ms=500)).values():
                for rec in recs:
                    d = dispatch_of(rec.value)
                    if d is not None and d.id == cid:
                        out.append(d)
    finally:
        await consumer.stop()


def test_a_revoked_site_principal_can_no_longer_connect(
    stack: Settings, sites: dict[str, Settings], caplog: pytest.LogCaptureFixture
) -> None:
    site = site_of(sites["A"])
    spare = new_principal(stack, site)
    assert asyncio.run(refused(produce(spare, site_topic(site, "telemetry")))) is None
    listed = microgrid_cli("keys", "list", "--kafka", "--site", site, "--json")
    assert listed.returncode == 0, listed.stderr
    assert {p["username"]: p["active"] for p in json.loads(listed.stdout)}[spare.kafka_username]
    done = microgrid_cli("keys", "revoke", spare.kafka_username)
    assert done.returncode == 0, done.stderr
    error = asyncio.run(refusal(produce(spare, site_topic(site, "telemetry"))))
    assert_refused_for(error, caplog, "SaslAuthenticationFailed")
    listed = microgrid_cli("keys", "list", "--kafka", "--site", site, "--json")
    states = {p["username"]: p["active"] for p in json.loads(listed.stdout)}
    assert states[spare.kafka_username] is False
    assert states[sites["A"].kafka_username] is True
    # the site's other principal keeps working
    assert asyncio.run(refused(produce(sites["A"], site_topic(site, "telemetry")))) is None


def test_kafka_setup_restores_the_components_access_to_sites_topics(
    stack: Settings, sites: dict[str, Settings]
) -> None:
    """After a broker lost them (rebuilt, or a new namespace on the same database), `kafka
    setup` (and `stack up`, `run`) makes the sites' topics' ACLs for the components again."""
    from runtime.kafka_access import admin_client, matching, site_acl_bindings

    site = site_of(sites["B"])
    wanted = site_acl_bindings(stack, site)
    filters = [matching(b) for b in wanted]
    admin = admin_client(stack)

    def present() -> int:
        return sum(len(admin.describe_acls(f).result(timeout=30)) for f in filters)

    for future in admin.delete_acls(filters).values():
        future.result(timeout=30)
    assert present() == 0
    controller = stack.as_service("controller")
    dispatch = site_topic(site, "dispatch")
    assert asyncio.run(refused(produce(controller, dispatch))) is TopicAuthorizationFailedError
    done = microgrid_cli("kafka", "setup")
    assert done.returncode == 0, done.stderr
    assert present() == len(wanted)
    assert asyncio.run(refused(produce(controller, dispatch))) is None
