"""Control commands through their lifecycle, to devices over HTTP and over Kafka."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import msgspec
import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from contracts import Topics
from contracts.control import CommandDispatch, CommandResult
from runtime.keys import create_key
from runtime.settings import Settings
from tests.conftest import Components, wait_for
from tests.sse import SSEClient
from tests.support import new_device

TERMINAL = ("succeeded", "failed")


def register(
    platform: Components,
    db: psycopg.Connection,
    key: str,
    site: str,
    device_type: str = "battery",
) -> str:
    """A device that has reported once, so the API knows its type."""
    device = new_device()
    body = {
        "device_id": device,
        "site_id": site,
        "device_type": device_type,
        "ts": datetime.now(UTC).isoformat(),
        "soc_pct": 50,
    }
    r = httpx.post(
        f"{platform.gateway_url}/api/v1/telemetry",
        json=body,
        timeout=10,
        headers={"Authorization": f"Bearer {key}"},
    )
    assert r.status_code == 202
    wait_registered(db, device)
    return device


def wait_registered(db: psycopg.Connection, device: str) -> None:
    wait_for(
        lambda: db.execute("SELECT 1 FROM devices WHERE device_id = %s", (device,)).fetchone(),
        10,
        "device registered",
    )


def command(
    platform: Components,
    token: str,
    device: str,
    ttl_s: int = 60,
    key: str | None = None,
    **body: Any,
) -> str:
    payload = {
        "device_id": device,
        "command": "charge",
        "params": {"power_kw": 5},
        "ttl_s": ttl_s,
        **body,
    }
    headers = {"Authorization": f"Bearer {token}"}
    if key:
        headers["Idempotency-Key"] = key
    r = httpx.post(
        f"{platform.api_url}/api/v1/control/commands", json=payload, headers=headers, timeout=10
    )
    assert r.status_code == 202, r.text
    # a retry with the same Idempotency-Key reports the command's current status
    assert r.json()["status"] == "queued" or key is not None
    return str(r.json()["id"])


def detail(platform: Components, token: str, cid: str) -> dict[str, Any]:
    r = httpx.get(
        f"{platform.api_url}/api/v1/control/commands/{cid}",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert r.status_code == 200
    return dict(r.json())


def settled(platform: Components, token: str, cid: str, timeout: float = 15) -> dict[str, Any]:
    return dict(
        wait_for(
            lambda: (d := detail(platform, token, cid))["status"] in TERMINAL and d,
            timeout,
            f"command {cid} to finish",
        )
    )


def fetch_next(platform: Components, key: str, device: str, wait: float = 5) -> httpx.Response:
    return httpx.get(
        f"{platform.gateway_url}/api/v1/devices/{device}/commands/next",
        params={"wait": wait},
        headers={"Authorization": f"Bearer {key}"},
        timeout=wait + 10,
    )


def answer(
    platform: Components, key: str, cid: str, status: str, reason: str = ""
) -> httpx.Response:
    return httpx.post(
        f"{platform.gateway_url}/api/v1/control/commands/{cid}/result",
        json={"status": status, "reason": reason},
        headers={"Authorization": f"Bearer {key}"},
        timeout=10,
    )


def test_http_device_takes_and_completes_a_command_seen_live(
    platform: Components,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
) -> None:
    device = register(platform, db, device_key, site)
    sse = SSEClient(f"{platform.api_url}/api/v1/stream", tokens["viewer"])
    cid = command(platform, tokens["operator"], device)
    got = fetch_next(platform, device_key, device)
    assert got.status_code == 200
    assert got.json() | {"deadline": None} == {
        "id": cid,
        "device_id": device,
        "command": "charge",
        "params": {"power_kw": 5},
        "deadline": None,
    }
    assert fetch_next(platform, device_key, device, wait=0.5).status_code == 204  # handed out once
    assert answer(platform, device_key, cid, "succeeded").status_code == 202
    done = settled(platform, tokens["viewer"], cid)
    assert done["status"] == "succeeded"
    assert [h["status"] for h in done["history"]] == ["queued", "processing", "succeeded"]

    def seen_live() -> bool:
        events = [e.data for e in sse.of("control.updated", id=cid)]
        statuses = [e["status"] for e in events]
        changes = [s for i, s in enumerate(statuses) if i == 0 or s != statuses[i - 1]]
        return changes == ["queued", "processing", "succeeded"] and any(
            e["delivered_at"] for e in events
        )

    # each change once, in order; the delivery is a change too (delivered_at), announced
    # whenever its event arrives, so it may repeat the status of the moment
    wait_for(seen_live, 10, "control.updated events")
    sse.close()


def test_device_failure_is_recorded_with_its_reason(
    platform: Components,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
) -> None:
    device = register(platform, db, device_key, site)
    cid = command(platform, tokens["operator"], device)
    assert fetch_next(platform, device_key, device).status_code == 200
    assert answer(platform, device_key, cid, "failed", "interlock active").status_code == 202
    done = settled(platform, tokens["viewer"], cid)
    assert (done["status"], done["reason"]) == ("failed", "interlock active")
    assert done["history"][-1]["reason"] == "interlock active"


def test_unanswered_command_times_out_and_a_late_reply_changes_nothing(
    platform: Components,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
) -> None:
    device = register(platform, db, device_key, site)
    cid = command(platform, tokens["operator"], device, ttl_s=1)
    done = settled(platform, tokens["viewer"], cid, timeout=10)
    assert (done["status"], done["reason"]) == ("failed", "timeout")
    assert answer(platform, device_key, cid, "succeeded").status_code == 202
    time.sleep(1.5)
    after = detail(platform, tokens["viewer"], cid)
    assert (after["status"], after["reason"]) == ("failed", "timeout")
    assert after["history"] == done["history"]


def test_kafka_device_consumes_dispatch_and_replies_on_results(
    platform: Components,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
    stack: Settings,
) -> None:
    device = register(platform, db, device_key, site, device_type="genset")

    async def act_as_device(ready: threading.Event, seen: list[CommandDispatch]) -> None:
        consumer = AIOKafkaConsumer(
            stack.topic(Topics.CONTROL_DISPATCH),
            **stack.kafka_client,
            group_id=f"test-device-{uuid.uuid4().hex[:6]}",
            auto_offset_reset="latest",
        )
        producer = AIOKafkaProducer(**stack.kafka_client, acks="all")
        await consumer.start()
        await producer.start()
        while not consumer.assignment():  # noqa: ASYNC110 (no event to wait on)
            await asyncio.sleep(0.1)
        await consumer.seek_to_end()
        ready.set()
        try:
            deadline = time.monotonic() + 20
            while not seen and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for rec in records:
                        d = msgspec.json.decode(rec.value or b"", type=CommandDispatch)
                        if d.device_id == device:
                            seen.append(d)
                            reply = CommandResult(id=d.id, device_id=device, status="succeeded")
                            await producer.send_and_wait(
                                stack.topic(Topics.CONTROL_RESULTS),
                                msgspec.json.encode(reply),
                                key=device.encode(),
                            )
        finally:
            await consumer.stop()
            await producer.stop()

    ready, seen = threading.Event(), []  # type: ignore[var-annotated]
    worker = threading.Thread(target=lambda: asyncio.run(act_as_device(ready, seen)))
    worker.start()
    assert ready.wait(20)
    cid = command(platform, tokens["operator"], device, command="start", params={})
    done = settled(platform, tokens["viewer"], cid)
    worker.join()
    assert done["status"] == "succeeded"
    assert [d.id for d in seen] == [cid]


def test_devices_see_and_answer_only_their_own_commands(
    platform: Components,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
) -> None:
    device = register(platform, db, device_key, site)
    cid = command(platform, tokens["operator"], device)
    # the gateway knows a command once the control projection has it (before, any key gets
    # 404 for it): wait for that, so the refusals below are the ones for a known command
    wait_for(
        lambda: db.execute("SELECT 1 FROM control_commands WHERE id = %s", (cid,)).fetchone(),
        30,
        "the command in the control read model",
    )
    other_key = create_key(db, f"other-{uuid.uuid4().hex[:6]}")
    assert fetch_next(platform, other_key, device, wait=0).status_code == 403
    assert answer(platform, other_key, cid, "succeeded").status_code == 403
    assert answer(platform, device_key, str(uuid.uuid4()), "succeeded").status_code == 404
    bad = httpx.post(
        f"{platform.gateway_url}/api/v1/control/commands/{cid}/result",
        json={"status": "done"},
        headers={"Authorization": f"Bearer {device_key}"},
        timeout=10,
    )
    assert bad.status_code == 422
    assert detail(platform, tokens["viewer"], cid)["status"] in ("queued", "processing")


def test_same_idempotency_key_never_executes_twice(
    platform: Components,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
) -> None:
    device = register(platform, db, device_key, site)
    key = f"k-{uuid.uuid4().hex}"
    first = command(platform, tokens["operator"], device, key=key)
    again = command(platform, tokens["operator"], device, key=key)
    assert first == again
    assert fetch_next(platform, device_key, device).json()["id"] == first
    assert fetch_next(platform, device_key, device, wait=1).status_code == 204
    rows = db.execute("SELECT count(*) FROM control_commands WHERE device_id = %s", (device,))
    assert rows.fetchone() == (1,)


def test_controller_killed_with_commands_in_flight_ends_each_in_one_terminal_state(
    platform: Components,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
) -> None:
    devices = [register(platform, db, device_key, site) for _ in range(4)]
    ids = [command(platform, tokens["operator"], d, ttl_s=6) for d in devices for _ in range(3)]
    platform.kill("controller")
    more = [command(platform, tokens["operator"], d, ttl_s=6) for d in devices]
    platform.start("controller")
    answered: list[str] = []
    until = time.monotonic() + 4
    while time.monotonic() < until:  # a device answers about half of what it receives
        for d in devices:
            got = fetch_next(platform, device_key, d, wait=0.2)
            if got.status_code == 200:
                cid = got.json()["id"]
                status = "succeeded" if len(answered) % 2 == 0 else "failed"
                if len(answered) % 4 != 3:
                    assert answer(platform, device_key, cid, status, "test").status_code == 202
                answered.append(cid)
    for cid in ids + more:
        done = settled(platform, tokens["viewer"], cid, timeout=20)
        statuses = [h["status"] for h in done["history"]]
        assert sum(s in TERMINAL for s in statuses) == 1, statuses
        assert statuses[-1] == done["status"]
        assert statuses == sorted(statuses, key=["queued", "processing", *TERMINAL].index)
    assert answered  # some went through the device, the rest timed out
