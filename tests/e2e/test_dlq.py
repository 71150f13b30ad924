"""`microgrid dlq list|show|redrive` on the running platform: a refused record is counted,
shown, and, once its cause is fixed, redriven and stored exactly once; a record still refused
after a redrive comes back with its count and is not sent again; bad arguments say what is
wrong. The session's dead-letter topics are shared by every test: each selection names its own
device (the validator's reasons carry it) or starts at the test's own time."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic, RecordsToDelete

from contracts import Headers, Topics
from runtime.kafka import delete_topics
from runtime.settings import PROJECT_ROOT, Settings
from tests.conftest import Components, wait_for
from tests.e2e.test_ingest_kafka import dead_letters, produce
from tests.e2e.test_reading_identity import identity_rows, stored_power
from tests.support import microgrid_cli, new_device, reading, stored_count


def dlq(*args: str) -> subprocess.CompletedProcess[str]:
    return microgrid_cli("dlq", *args)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, done.stderr
    return done.stdout


def listed(*args: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in ok(dlq("list", "--json", *args)).splitlines()]


def post(url: str, key: str, body: dict[str, Any]) -> int:
    r = httpx.post(f"{url}/api/v1/telemetry", json=body, headers={"Authorization": f"Bearer {key}"})
    return r.status_code


async def records_of(s: Settings, topic: str, key: bytes) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of `topic` (namespaced here) with this key, up to its end now."""
    consumer = AIOKafkaConsumer(**s.kafka_client, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(s.topic(topic), p) for p in range(s.device_topic_partitions)]
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        for tp, begin in (await consumer.beginning_offsets(tps)).items():
            consumer.seek(tp, begin)
        found = []
        pending = {tp for tp in tps if ends[tp] > 0}
        while pending:
            for recs in (await consumer.getmany(*pending, timeout_ms=500)).values():
                found += [r for r in recs if r.key == key]
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
        return found
    finally:
        await consumer.stop()


def redriven_rows(db: psycopg.Connection, s: Settings, letter: dict[str, Any]) -> list[Any]:
    return db.execute(
        "SELECT target_topic, redrive_count FROM dlq_redrives"
        " WHERE dlq_topic = %s AND dlq_partition = %s AND dlq_offset = %s",
        (s.topic(letter["topic"]), letter["partition"], letter["offset"]),
    ).fetchall()


def summary(out: str) -> dict[str, int]:
    """The redrive summary's counts by line label."""
    counts = {}
    for line in out.splitlines():
        for label in ("sent", "would send", "already redriven", "skipped, max redrives"):
            rest = line.strip().removeprefix(label)
            if rest != line.strip() and rest[:1] == " " and rest.split()[0].isdigit():
                counts[label] = int(rest.split()[0])
    return counts


def test_a_refused_reading_is_counted_shown_and_redriven_once_after_the_fix(
    platform: Components, db: psycopg.Connection, stack: Settings, site: str, device_key: str
) -> None:
    # A battery of site A moves to this site; its direct Kafka client names the new site before
    # an admin moved the device in the registry, so the validator refuses its reading.
    device, old_site = new_device(), f"site-{uuid.uuid4().hex[:8]}"
    ok(microgrid_cli("devices", "add", device, "--site", old_site))
    refused = reading(device, site, seq=1)
    asyncio.run(produce(stack, [(device.encode(), json.dumps(refused).encode())]))
    [rec] = asyncio.run(dead_letters(stack, device.encode(), want=1))
    assert Headers.REDRIVE_COUNT not in dict(rec.headers)

    out = ok(dlq("list", "--reason", device))
    assert (
        f"1 dead letter (telemetry.dlq, alerts.dlq, control.dlq; reason containing '{device}')"
        in out
    )
    pattern = "device '…' belongs to another site than '…'"
    assert any(
        line.split() == ["1", "telemetry.dlq", *pattern.split()] for line in out.splitlines()
    )
    assert f"e.g. device '{device}' belongs to another site than '{site}'" in out
    [letter] = listed("--reason", device.upper())  # any case
    ref = f"telemetry.dlq:{rec.partition}:{rec.offset}"
    assert letter["letter"] == ref
    assert letter["stage"] == "microgrid.validator"
    assert letter["source"]["topic"] == Topics.TELEMETRY_RAW
    assert letter["redrive_count"] is None
    assert letter["reason_group"] == pattern
    row = next(line for line in out.splitlines() if line.startswith(ref))
    assert "microgrid.validator" in row and f"{Topics.TELEMETRY_RAW}[" in row

    shown = ok(dlq("show", ref))
    assert shown.splitlines()[0] == ref
    for name, value in (
        (Headers.DLQ_REASON, f"device '{device}' belongs to another site than '{site}'"),
        (Headers.DLQ_STAGE, stack.group("microgrid.validator")),
        (Headers.DLQ_SOURCE_TOPIC, stack.topic(Topics.TELEMETRY_RAW)),
        (Headers.DLQ_SOURCE_OFFSET, dict(rec.headers)[Headers.DLQ_SOURCE_OFFSET].decode()),
    ):
        assert any(line.split(None, 1) == [name, value] for line in shown.splitlines()), name
    assert f"key       {device}" in shown
    assert "JSON" in shown and f'"device_id": "{device}"' in shown
    assert f'"ts": "{refused["ts"]}"' in shown

    # The fix: the device is moved; a marker through the gateway shows every stage knows it.
    ok(microgrid_cli("devices", "move", device, "--to", site, "--reason", "moved to this site"))
    dry = ok(dlq("redrive", "--reason", device, "--dry-run"))
    assert f"would send {ref} -> {Topics.TELEMETRY_RAW} (x-redrive-count 1)" in dry
    assert summary(dry)["would send"] == 1
    assert redriven_rows(db, stack, letter) == []
    wait_for(
        lambda: post(platform.gateway_url, device_key, reading(device, site, seq=2)) == 202,
        15,
        "the moved device's reading accepted",
    )
    wait_for(lambda: stored_count(db, [device])[0] >= 1, what="the marker stored")
    assert stored_count(db, [device]) == (1, 1)  # the dry run sent nothing

    done = ok(dlq("redrive", "--reason", device))
    assert summary(done) == {"sent": 1, "already redriven": 0, "skipped, max redrives": 0}
    assert f"({Topics.TELEMETRY_RAW} 1)" in done
    wait_for(lambda: stored_count(db, [device]) == (2, 2), what="the redriven reading stored")
    assert redriven_rows(db, stack, letter) == [(stack.topic(Topics.TELEMETRY_RAW), 1)]

    again = ok(dlq("redrive", "--reason", device))
    assert summary(again) == {"sent": 0, "already redriven": 1, "skipped, max redrives": 0}
    assert post(platform.gateway_url, device_key, reading(device, site, seq=3)) == 202
    wait_for(lambda: stored_count(db, [device]) == (3, 3), what="a later marker stored")
    assert identity_rows(db, [device]) == (3, 3)
    once = "SELECT count(*) FROM telemetry_readings WHERE device_id = %s AND ts = %s"
    assert db.execute(once, (device, datetime.fromisoformat(refused["ts"]))).fetchone() == (1,)
    raw = asyncio.run(records_of(stack, Topics.TELEMETRY_RAW, device.encode()))
    sent = [r for r in raw if Headers.REDRIVEN_FROM in dict(r.headers)]
    assert len(sent) == 1  # the second redrive sent nothing
    headers = dict(sent[0].headers)
    assert headers[Headers.REDRIVE_COUNT] == b"1"
    origin = f"{stack.topic(Topics.TELEMETRY_DLQ)}:{rec.partition}:{rec.offset}"
    assert headers[Headers.REDRIVEN_FROM] == origin.encode()
    assert sent[0].value == json.dumps(refused).encode() and sent[0].key == device.encode()


def test_a_record_still_refused_after_a_redrive_comes_back_counted_and_stays(
    platform: Components, db: psycopg.Connection, stack: Settings, site: str, device_key: str
) -> None:
    since = datetime.now(UTC).isoformat()
    # Refused by the validator: a device of another site, not fixed before the redrive.
    device, other = new_device(), f"site-{uuid.uuid4().hex[:8]}"
    ok(microgrid_cli("devices", "add", device, "--site", other))
    asyncio.run(produce(stack, [(device.encode(), json.dumps(reading(device, site)).encode())]))
    asyncio.run(dead_letters(stack, device.encode(), want=1))
    done = ok(dlq("redrive", "--reason", device))
    assert summary(done)["sent"] == 1
    first, back = asyncio.run(dead_letters(stack, device.encode(), want=2))
    assert dict(back.headers)[Headers.REDRIVE_COUNT] == b"1"
    assert back.value == first.value
    assert dict(back.headers)[Headers.DLQ_REASON] == dict(first.headers)[Headers.DLQ_REASON]
    again = ok(dlq("redrive", "--reason", device))
    assert summary(again) == {"sent": 0, "already redriven": 1, "skipped, max redrives": 1}
    assert [x["redrive_count"] for x in listed("--reason", device)] == [None, 1]

    # Refused by the telemetry projection: a conflicting duplicate, one reading, from
    # telemetry.valid; it goes back there as a batch of one and is refused once more.
    twin = new_device()
    original = reading(twin, site, seq=7, power_kw=1.5)
    assert post(platform.gateway_url, device_key, original) == 202
    wait_for(lambda: stored_power(db, twin) == [1.5], what="the first reading")
    assert post(platform.gateway_url, device_key, {**original, "power_kw": 9.5}) == 202
    topic = Topics.TELEMETRY_DLQ
    asyncio.run(dead_letters(stack, twin.encode(), want=1, source=Topics.TELEMETRY_VALID))
    selected = ("--reason", "conflicting duplicate", "--since", since)
    done = ok(dlq("redrive", *selected))
    assert summary(done)["sent"] == 1 and f"({Topics.TELEMETRY_VALID} 1)" in done
    letters = asyncio.run(dead_letters(stack, twin.encode(), want=2, topic=topic))
    assert [dict(r.headers).get(Headers.REDRIVE_COUNT) for r in letters] == [None, b"1"]
    assert json.loads(letters[1].value)["power_kw"] == 9.5  # the reading, not the batch
    valid = asyncio.run(records_of(stack, Topics.TELEMETRY_VALID, twin.encode()))
    [redriven] = [r for r in valid if Headers.REDRIVEN_FROM in dict(r.headers)]
    assert json.loads(redriven.value) == {"readings": [json.loads(letters[0].value)]}
    again = ok(dlq("redrive", *selected))
    assert summary(again) == {"sent": 0, "already redriven": 1, "skipped, max redrives": 1}
    assert stored_power(db, twin) == [1.5]


def namespaced_cli(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "microgrid.cli", "dlq", *args],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        env={**os.environ, "KAFKA_NAMESPACE": ns},
        timeout=60,
    )


def test_bad_arguments_exit_non_zero_and_say_why(stack: Settings) -> None:
    cases = [
        (("list", "--topic", "telemetry.raw"), "unknown dead-letter topic 'telemetry.raw'"),
        (("redrive", "--topic", "nope.dlq", "--dry-run"), "unknown dead-letter topic"),
        (("list", "--since", "yesterday"), "'yesterday' is not a time"),
        (("redrive", "--since", "2026-11-30T08:00:00"), "has no UTC offset"),
        (("show", "telemetry.dlq:one:2"), "is not TOPIC:PARTITION:OFFSET"),
        (("show", "telemetry.dlq"), "is not TOPIC:PARTITION:OFFSET"),
        (("show", "telemetry.raw:0:0"), "unknown dead-letter topic"),
        (("show", "telemetry.dlq:99:0"), "telemetry.dlq has partitions 0 to 3"),
        (("show", "alerts.dlq:0:1000000000"), "is out of range: partition 0 of alerts.dlq"),
    ]
    for args, message in cases:
        done = dlq(*args)
        assert done.returncode != 0, args
        assert message in done.stderr, (args, done.stderr)

    # A namespace of its own: the other dead-letter topics missing, records lost to retention.
    ns = f"test-dlq-{uuid.uuid4().hex[:8]}."
    asyncio.run(_retention_namespace(stack, ns))
    try:
        empty = namespaced_cli(ns, "list", "--topic", "telemetry.dlq")
        assert empty.returncode == 0 and "no dead letters" in empty.stdout
        asyncio.run(_letters_then_retention(stack, ns))
        gone = namespaced_cli(ns, "show", "telemetry.dlq:0:1")
        assert gone.returncode == 1
        assert "telemetry.dlq:0:1 is no longer in the log" in gone.stderr
        shown = namespaced_cli(ns, "show", f"{ns}telemetry.dlq:0:2")  # namespaced works too
        assert shown.returncode == 0 and "old 2" in shown.stdout
        assert "binary" in namespaced_cli(ns, "show", "telemetry.dlq:0:3").stdout
        missing = namespaced_cli(ns, "list")
        assert missing.returncode == 1
        assert f"topic '{ns}alerts.dlq' does not exist" in missing.stderr
        left = namespaced_cli(ns, "list", "--topic", "telemetry.dlq")
        assert left.returncode == 0 and "2 dead letters" in left.stdout
    finally:
        asyncio.run(delete_topics(stack, [f"{ns}telemetry.dlq"]))


async def _retention_namespace(s: Settings, ns: str) -> None:
    admin = AIOKafkaAdminClient(**s.kafka_client)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(f"{ns}telemetry.dlq", 1, 1)])
    finally:
        await admin.close()


async def _letters_then_retention(s: Settings, ns: str) -> None:
    topic = f"{ns}telemetry.dlq"
    producer = AIOKafkaProducer(**s.kafka_client, acks="all", enable_idempotence=True)
    await producer.start()
    try:
        for value in (b"old 0", b"old 1", b"old 2", b"\x00\xff binary"):
            await producer.send_and_wait(
                topic, value, key=b"k", headers=[(Headers.DLQ_REASON, b"test")]
            )
    finally:
        await producer.stop()
    admin = AIOKafkaAdminClient(**s.kafka_client)
    await admin.start()
    try:
        await admin.delete_records({TopicPartition(topic, 0): RecordsToDelete(before_offset=2)})
    finally:
        await admin.close()
