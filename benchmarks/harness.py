"""`microgrid bench`: drive load at the running platform and check it against SLOs.

Open-loop load (requests start on schedule, however slow the answers), then a wait until every
accepted reading is visible in PostgreSQL. Reports the contract's JSON, a PNG chart beside it,
and exits non-zero when the SLO fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import msgspec
import psycopg

from benchmarks.cpu import CpuMeter
from benchmarks.http_client import HttpClient
from benchmarks.limit import kafka_roundtrip_per_min
from benchmarks.planted import AlertProbe
from benchmarks.profiles import Options, Profile, Tally
from benchmarks.report import Report, percentiles, write_chart
from benchmarks.stamps import Stamps
from contracts import Topics
from runtime.kafka import reliable_producer
from runtime.keys import create_key
from runtime.retry import RETRY_STATUSES, Retry, RetryPolicy, call_with_retries
from runtime.settings import Settings


class Load:
    """Builds the readings of one run: devices `bench-<run>-<i>`, sequence numbers per device,
    and a distinct `ts` for every reading (`benchmarks.stamps`): a reading's identity is
    `(device_id, ts)`, so two readings of a device must never share one."""

    def __init__(self, run: str, profile: Profile, site: str, stamps: Stamps | None = None) -> None:
        self.run, self.p, self.site = run, profile, site
        self.stamps = stamps or Stamps()
        self.next_device = 0
        self.devices = max(profile.devices_per_batch, 1000)
        self.names = [f"bench-{run}-{i}" for i in range(self.devices)]
        self.seq = [0] * self.devices
        self.n_dev = (
            1 if profile.mode == "single" else min(profile.devices_per_batch, profile.batch)
        )
        self.per = 1 if profile.mode == "single" else profile.batch // self.n_dev

    def readings(self) -> list[dict[str, Any]]:
        n_dev, per = self.n_dev, self.per
        stamps = self.stamps.isos(self.stamps.take(n_dev * per), n_dev * per)
        out = []
        k = 0
        for _ in range(n_dev):
            i = self.next_device % self.devices
            self.next_device += 1
            device, first = self.names[i], self.seq[i]
            self.seq[i] = first + per
            for seq in range(first, first + per):
                out.append(
                    {
                        "device_id": device,
                        "site_id": self.site,
                        "device_type": "meter",
                        "ts": stamps[k],
                        "seq": seq,
                        "power_kw": 12.5,
                        "voltage_v": 230.1,
                        "frequency_hz": 50.0,
                    }
                )
                k += 1
        return out


class Transport:
    retries = 0  # requests resent
    retried_requests = 0  # requests resent at least once

    async def send(self, readings: list[dict[str, Any]]) -> str | None:
        """None when accepted, else the error class."""
        raise NotImplementedError

    async def close(self) -> None:
        return None


ACCEPTED = "accepted"
# Each attempt waits at most this long for its answer; a request is resent until its deadline.
ATTEMPT_TIMEOUT_S = 10.0


def bench_retry_policy(deadline_s: float) -> RetryPolicy:
    """As the README tells clients: after 503/429 what `Retry-After` says (at most 10 s),
    after a timeout or a connection error 0.1 s doubling up to 5 s, jittered, until the
    request's deadline."""
    return RetryPolicy(initial_s=0.1, max_s=5.0, max_retry_after_s=10.0, deadline_s=deadline_s)


class HttpTransport(Transport):
    """Keep-alive HTTP/1.1 with prepared request heads (see `benchmarks.http_client`).

    Resends a request answered 503 or 429, or that timed out or lost its connection, until
    `retry_deadline_s` after its first attempt (0: never resends); then its readings count
    under the last attempt's error class. Resending is harmless: a reading the log already
    holds has the same identity `(device_id, ts)` and is dropped as a duplicate."""

    def __init__(self, s: Settings, key: str, mode: str, retry_deadline_s: float = 30.0) -> None:
        path = "/api/v1/telemetry" if mode == "single" else "/api/v1/telemetry/batch"
        self.mode = mode
        self.client = HttpClient(s.gateway_host, s.gateway_port)
        self.head = self.client.prepare(
            path, {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        )
        self.retry = retry_deadline_s > 0
        self.policy = bench_retry_policy(retry_deadline_s)

    async def send(self, readings: list[dict[str, Any]]) -> str | None:
        body = msgspec.json.encode(readings[0] if self.mode == "single" else {"readings": readings})
        if not self.retry:
            once = await self._attempt(body, ATTEMPT_TIMEOUT_S)
            outcome = once.value if isinstance(once, Retry) else once
        else:
            outcome, retries = await call_with_retries(partial(self._attempt, body), self.policy)
            if retries:
                self.retries += retries
                self.retried_requests += 1
        return None if outcome == ACCEPTED else outcome

    async def _attempt(self, body: bytes, left_s: float) -> str | Retry[str]:
        """ACCEPTED or the error class, wrapped in a `Retry` when a resend may succeed."""
        try:
            answer = await self.client.post(
                self.head, body, min(ATTEMPT_TIMEOUT_S, max(1.0, left_s))
            )
        except (OSError, TimeoutError):
            return Retry("network")
        status = answer.status
        if status == 202:
            return ACCEPTED
        error = "4xx" if status < 500 else "5xx"
        return Retry(error, answer.retry_after) if status in RETRY_STATUSES else error

    async def close(self) -> None:
        await self.client.close()


class KafkaTransport(Transport):
    """The path of devices with Kafka clients: one record per device, straight to raw."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.producer = reliable_producer(s, client_id="microgrid-bench")
        self.started = False

    async def send(self, readings: list[dict[str, Any]]) -> str | None:
        if not self.started:
            await self.producer.start()
            self.started = True
        by_device: dict[str, list[dict[str, Any]]] = {}
        for r in readings:
            by_device.setdefault(r["device_id"], []).append(r)
        try:
            futures = [
                await self.producer.send(
                    self.s.topic(Topics.TELEMETRY_RAW),
                    msgspec.json.encode({"readings": group}),
                    key=device.encode(),
                )
                for device, group in by_device.items()
            ]
            await asyncio.gather(*futures)
        except Exception:
            return "network"
        return None

    async def close(self) -> None:
        if self.started:
            await self.producer.stop()


TICK_S = 0.002


async def drive(
    transport: Transport,
    load: Load,
    per_min: float,
    batch: int,
    duration: float,
    tally: Tally,
    progress: Any,
    max_inflight: int = 64,
) -> None:
    """Start requests on a fixed schedule for `duration` seconds (open loop, bounded)."""
    interval = 60.0 / (per_min / batch)
    start = time.monotonic()
    inflight: set[asyncio.Task[None]] = set()
    slots = asyncio.Semaphore(max_inflight)

    async def one(readings: list[dict[str, Any]]) -> None:
        async with slots:
            t0 = time.perf_counter()
            error = await transport.send(readings)
            latency = time.perf_counter() - t0
        tally.latencies.append(latency)
        tally.timeline.append(
            (time.monotonic() - start, len(readings) if error is None else 0, latency)
        )
        if error is None:
            tally.accepted += len(readings)
            now = time.time()
            for r in readings:
                tally.accepted_at[(r["device_id"], r["seq"])] = now
        else:
            tally.errors[error] += len(readings)

    i = 0
    while (due := start + i * interval) < start + duration:
        # wake at most every TICK_S and start every request due by then: a timer per request
        # would cost the load generator a wakeup each
        await asyncio.sleep(max(0.0, due - time.monotonic(), TICK_S))
        now = time.monotonic()
        while (due := start + i * interval) <= now and due < start + duration:
            readings = load.readings()
            tally.attempted += len(readings)
            task = asyncio.create_task(one(readings))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            i += 1
        progress(now - start)
    if inflight:
        await asyncio.gather(*inflight)


def persisted(s: Settings, run: str, since: datetime) -> list[tuple[str, int, datetime]]:
    with psycopg.connect(s.database_url) as conn:
        cur = conn.execute(
            "SELECT device_id, seq, ingested_at FROM telemetry_readings"
            " WHERE device_id LIKE %s AND ts >= %s AND seq IS NOT NULL",
            (f"bench-{run}-%", since),
        )
        return [(d, int(q), at) for d, q, at in cur.fetchall()]


async def wait_persisted(
    s: Settings, run: str, since: datetime, want: int, drain_s: float, echo: Any
) -> list[tuple[str, int, datetime]]:
    deadline = time.monotonic() + drain_s
    rows = await asyncio.to_thread(persisted, s, run, since)
    while len(rows) < want and time.monotonic() < deadline:
        echo(f"\rwaiting for PostgreSQL: {len(rows)}/{want} persisted ", nl=False)
        await asyncio.sleep(1.0)
        rows = await asyncio.to_thread(persisted, s, run, since)
    echo("")
    return rows


async def run_once(s: Settings, o: Options, echo: Any, per_min: float | None = None) -> Report:
    run = uuid.uuid4().hex[:8]
    site = f"bench-{run}"
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        key = create_key(conn, site)
    p = o.profile
    rate = per_min or p.per_min
    transport: Transport = (
        KafkaTransport(s)
        if o.transport == "kafka"
        else HttpTransport(s, key, p.mode, o.retry_deadline_s)
    )
    load, tally = Load(run, p, site), Tally()
    probe = AlertProbe(s, key, site, run)
    since = datetime.now(UTC)
    last = [0.0]

    def progress(elapsed: float) -> None:
        if elapsed - last[0] >= 2.0:
            last[0] = elapsed
            p95 = percentiles(tally.latencies[-2000:])["p95"]
            echo(
                f"\r{p.name} {elapsed:5.0f}/{o.duration:.0f}s attempted {tally.attempted:,}"
                f" accepted {tally.accepted:,} errors {sum(tally.errors.values()):,}"
                f" p95 {p95:.0f} ms ",
                nl=False,
            )

    async with probe:
        meter = CpuMeter()
        meter.start()
        cpu0, wall0 = time.process_time(), time.monotonic()
        planting = asyncio.create_task(probe.plant_every(10.0, o.duration))
        await drive(transport, load, rate, p.batch, o.duration, tally, progress)
        elapsed = time.monotonic() - wall0
        cpu = time.process_time() - cpu0
        cpu_by_process = meter.stop(elapsed)
        planting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await planting
        echo("")
        rows = await wait_persisted(s, run, since, tally.accepted, o.drain_s, echo)
        alert_ms = await probe.latencies_ms()
    await transport.close()
    report = Report.build(p, o, rate, tally, rows, elapsed, cpu, alert_ms)
    report.extra["alerts_planted"] = len(probe.planted)
    report.extra["cpu_pct_by_process"] = cpu_by_process
    report.extra["retries"] = transport.retries
    report.extra["retried_requests"] = transport.retried_requests
    return report


async def benchmark(s: Settings, o: Options, echo: Any) -> Report:
    report = await run_once(s, o, echo) if o.profile.name != "max" else await ramp(s, o, echo)
    if o.measure_limit:
        # after the load: the limit's own records (and the broker's deleting them later)
        # must not share the machine with the run being measured
        echo("measuring the raw Kafka limit (plain aiokafka producer and consumer) ...")
        limit = await kafka_roundtrip_per_min(s, o.profile, seconds=min(10.0, o.duration))
        report.set_limit(limit)
    return report


HELD_SHARE = 0.98  # a step holds only if it accepted this share of the offered rate


async def ramp(s: Settings, o: Options, echo: Any) -> Report:
    """Raise the rate by half each step until a step does not hold: the SLO fails, a reading
    is lost, or the platform accepted less than 98 % of what the step offered (requests then
    wait in the load generator, where their latency is not counted)."""
    rate, best, steps = o.profile.per_min, None, []
    while True:
        echo(f"step: {rate:,.0f} readings/min")
        report = await run_once(s, o, echo, per_min=rate)
        steps.append(
            {
                "offered_per_min": rate,
                "throughput_per_min": report.throughput_per_min,
                "passed": report.slo["passed"],
            }
        )
        # every request is answered in the end; a step holds only if that happened in time
        kept_up = report.throughput_per_min >= HELD_SHARE * rate
        steps[-1]["kept_up"] = kept_up
        if (
            not report.slo["passed"]
            or report.persisted_messages < report.accepted_messages
            or not kept_up
        ):
            break
        best = report
        rate *= 1.5
    final = best or report
    final.extra["steps"] = steps
    return final


def save(report: Report, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    chart = path.with_suffix(".png")
    with contextlib.suppress(Exception):
        write_chart(report, chart)
    return chart
