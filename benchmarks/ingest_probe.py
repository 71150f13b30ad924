"""Overload and retry probe: closed-loop clients saturate the gateway's batch endpoint, every
reading identity sent is recorded with its final answer, and PostgreSQL is compared with it.

    python -m benchmarks.ingest_probe --duration 20 --concurrency 64
    python -m benchmarks.ingest_probe --duration 20 --concurrency 64 --retry

Needs the platform running (`microgrid run`). Each of `--concurrency` clients sends one batch
at a time (`--readings-per-batch` readings over `--devices-per-batch` devices of its own) and
the next as soon as the answer came. Without `--retry` every answer is final; with it a batch
answered 503 or 429, or that timed out or lost its connection, is resent as it was (same
readings, so the same identities) after `Retry-After` or a jittered backoff, until 202 or
`--retry-deadline` seconds after its first attempt (`runtime.retry`, as the README tells
clients).

Every reading has a `ts` of its own (`benchmarks.stamps`: distinct microseconds), so its
identity `(device_id, ts)` is known exactly. After the load it waits for PostgreSQL to settle
and prints requests by status, readings by final answer, rows stored for the run's devices,
distinct identities sent, and then, without `--retry`, how many readings answered 503/429 are
in PostgreSQL all the same (a 503 after a broker failure mid-production leaves the outcome
open); with `--retry`, whether rows == distinct identities == readings sent. Alongside: the
gateway processes' memory (RSS, sampled every second; the most seen) and the time until one
reading is accepted again after the load stops (one try every 100 ms).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Annotated, Final

import msgspec
import psutil
import psycopg
import typer

from benchmarks.http_client import HttpClient
from benchmarks.stamps import Stamps, datetime_us
from runtime.keys import create_key
from runtime.retry import RETRY_STATUSES, Retry, RetryPolicy, call_with_retries
from runtime.settings import Settings, get_settings

BATCH_PATH: Final = "/api/v1/telemetry/batch"
SINGLE_PATH: Final = "/api/v1/telemetry"
ATTEMPT_TIMEOUT_S: Final = 10.0
NETWORK: Final = 0  # the final "status" of a request that timed out or lost its connection
RECOVERY_INTERVAL_S: Final = 0.1
RECOVERY_TIMEOUT_S: Final = 120.0
SETTLED_AFTER_S: Final = 5.0  # PostgreSQL has settled when its count held this long


# --- what was sent, and what came back (pure) ---------------------------------------------


@dataclass
class Sent:
    """Every batch sent: its readings' identities and its final answer.

    A batch of `n` readings from client `w` has the timestamps `first .. first + n - 1`
    (microseconds, from one `Stamps`), reading `i` of device `i % devices` of that client, so
    the batches' first timestamps are sorted in the order they were made and a stored row's
    `ts` finds its batch by bisection."""

    run: str
    devices: int  # per client
    firsts: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    clients: list[int] = field(default_factory=list)
    finals: list[int] = field(default_factory=list)  # status, NETWORK, or -1 while unanswered

    def device(self, client: int, i: int) -> str:
        return f"probe-{self.run}-{client}-{i % self.devices}"

    def add(self, client: int, first: int, n: int) -> int:
        """A new batch; returns its index."""
        assert not self.firsts or first >= self.firsts[-1] + self.sizes[-1], "overlapping ts"
        self.firsts.append(first)
        self.sizes.append(n)
        self.clients.append(client)
        self.finals.append(-1)
        return len(self.firsts) - 1

    def answer(self, batch: int, status: int) -> None:
        self.finals[batch] = status

    @property
    def readings(self) -> int:
        """Readings sent, each counted once however often its batch was resent."""
        return sum(self.sizes)

    def distinct_identities(self) -> int:
        """Distinct `(device_id, ts)` over all batches: the size of the union of their
        timestamp ranges (a device's readings never share a `ts`, nor do two devices')."""
        total, end = 0, -1
        for first, n in sorted(zip(self.firsts, self.sizes, strict=True)):
            lo, hi = max(first, end), first + n
            if hi > lo:
                total += hi - lo
            end = max(end, hi)
        return total

    def readings_by_answer(self) -> dict[str, int]:
        out = {"202": 0, "503": 0, "429": 0, "other": 0}
        for n, status in zip(self.sizes, self.finals, strict=True):
            out[_answer_class(status)] += n
        return out

    def batch_of(self, device_id: str, ts_us: int) -> int | None:
        """The batch that sent this identity, or None if none did."""
        i = bisect.bisect_right(self.firsts, ts_us) - 1
        if i < 0 or ts_us >= self.firsts[i] + self.sizes[i]:
            return None
        if device_id != self.device(self.clients[i], ts_us - self.firsts[i]):
            return None
        return i

    def compare(self, stored: Iterable[tuple[str, int]]) -> Comparison:
        """Stored identities `(device_id, ts in microseconds)` against what was sent."""
        c = Comparison()
        seen: set[tuple[str, int]] = set()
        for identity in stored:
            c.rows += 1
            if identity in seen:
                c.duplicates += 1
                continue
            seen.add(identity)
            batch = self.batch_of(*identity)
            if batch is None:
                c.unknown += 1
            else:
                c.by_answer[_answer_class(self.finals[batch])] += 1
        return c


def _answer_class(status: int) -> str:
    return str(status) if status in (202, 503, 429) else "other"


@dataclass
class Comparison:
    rows: int = 0
    duplicates: int = 0  # rows repeating an identity (none while the identity is unique)
    unknown: int = 0  # rows of the run's devices that no batch sent
    by_answer: Counter[str] = field(default_factory=Counter)  # stored rows by final answer

    @property
    def refused_but_stored(self) -> int:
        return self.by_answer["503"] + self.by_answer["429"]


def status_label(status: int, body: bytes) -> str:
    """How one answer is counted under "requests by status": a problem's `outcome` member
    ("not stored", "unknown") is shown beside its status."""
    if status == NETWORK:
        return "timeout/connection error"
    outcome = _outcome(body) if status >= 400 else None
    return f"{status} ({outcome})" if outcome else str(status)


def _outcome(body: bytes) -> str | None:
    try:
        problem = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    outcome = problem.get("outcome") if isinstance(problem, dict) else None
    return outcome if isinstance(outcome, str) else None


def batch_body(stamps: Stamps, sent: Sent, client: int, site: str, n: int) -> tuple[int, bytes]:
    """A new batch of `n` readings for one client: its index in `sent` and its body."""
    first = stamps.take(n)
    batch = sent.add(client, first, n)
    readings = [
        {
            "device_id": sent.device(client, i),
            "site_id": site,
            "device_type": "meter",
            "ts": ts,
            "power_kw": 1.0,
            "voltage_v": 230.0,
        }
        for i, ts in enumerate(stamps.isos(first, n))
    ]
    return batch, msgspec.json.encode({"readings": readings})


def quantiles_ms(values_s: list[float]) -> str:
    if not values_s:
        return "-"
    ordered = sorted(values_s)

    def q(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000

    return f"p50 {q(0.5):.1f} ms, p95 {q(0.95):.1f} ms, p99 {q(0.99):.1f} ms"


# --- the gateway's memory ------------------------------------------------------------------


def _is_gateway(proc: psutil.Process) -> bool:
    try:
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    # `microgrid run` starts `python -m microgrid.components gateway` (uvicorn's workers are
    # its children)
    return "microgrid.components" in cmdline and cmdline[-1] == "gateway"


def _listens_on(proc: psutil.Process, port: int) -> bool:
    try:
        procs = [proc, *proc.children(recursive=True)]
        return any(
            c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
            for p in procs
            for c in p.net_connections(kind="tcp")
        )
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def gateway_roots(port: int) -> list[psutil.Process]:
    """The gateway component processes serving `port` (all gateways if none can be told)."""
    gateways = [p for p in psutil.process_iter() if _is_gateway(p)]
    serving = [p for p in gateways if _listens_on(p, port)]
    return serving or gateways


class GatewayMemory:
    """Samples the RSS of the gateway processes (the component and its workers)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.roots: list[psutil.Process] = []
        self.samples: list[int] = []  # bytes, all processes together
        self.max_process = 0
        self.processes = 0

    def sample(self) -> int | None:
        if not self.roots or not all(r.is_running() for r in self.roots):
            self.roots = gateway_roots(self.port)
        total, seen = 0, 0
        for root in self.roots:
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for p in procs:
                with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                    rss = p.memory_info().rss
                    total += rss
                    seen += 1
                    self.max_process = max(self.max_process, rss)
        if not seen:
            return None
        self.processes = max(self.processes, seen)
        self.samples.append(total)
        return total

    async def run(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.to_thread(self.sample)
            await asyncio.sleep(interval_s)

    def summary(self) -> str:
        if not self.samples:
            return "gateway memory: no gateway process found on this host"
        mib = 1024 * 1024
        return (
            f"gateway memory (RSS of {self.processes} processes, sampled every second): "
            f"first {self.samples[0] / mib:.0f} MiB, max {max(self.samples) / mib:.0f} MiB, "
            f"last {self.samples[-1] / mib:.0f} MiB; largest single process "
            f"{self.max_process / mib:.0f} MiB"
        )


# --- the load ------------------------------------------------------------------------------


class Probe:
    """The clients of one run, what they sent and what came back."""

    def __init__(
        self,
        s: Settings,
        run: str,
        key: str,
        readings_per_batch: int,
        devices_per_batch: int,
        retry_deadline_s: float | None,  # None: no retries
    ) -> None:
        self.run, self.site = run, f"probe-{run}"
        self.readings_per_batch = readings_per_batch
        self.retry_deadline_s = retry_deadline_s
        self.stamps = Stamps()
        self.sent = Sent(run, min(readings_per_batch, devices_per_batch))
        self.attempts: Counter[str] = Counter()  # every request sent, by status
        self.latencies: list[float] = []  # first attempt to final answer, per batch
        self.retries = 0
        self.last_answer = 0.0  # monotonic
        self.client = HttpClient(s.gateway_host, s.gateway_port)
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self.batch_head = self.client.prepare(BATCH_PATH, headers)
        self.single_head = self.client.prepare(SINGLE_PATH, headers)
        self.policy = RetryPolicy(
            initial_s=0.1, max_s=5.0, max_retry_after_s=10.0, deadline_s=retry_deadline_s
        )

    async def _attempt(self, body: bytes, left_s: float) -> int | Retry[int]:
        try:
            answer = await self.client.post(
                self.batch_head, body, min(ATTEMPT_TIMEOUT_S, max(1.0, left_s))
            )
        except (OSError, TimeoutError):
            self.attempts[status_label(NETWORK, b"")] += 1
            return Retry(NETWORK)
        self.attempts[status_label(answer.status, answer.body)] += 1
        if answer.status in RETRY_STATUSES:
            return Retry(answer.status, answer.retry_after)
        return answer.status

    async def client_loop(self, client: int, until: float) -> None:
        while time.monotonic() < until:
            batch, body = batch_body(
                self.stamps, self.sent, client, self.site, self.readings_per_batch
            )
            started = time.perf_counter()
            if self.retry_deadline_s is None:
                once = await self._attempt(body, ATTEMPT_TIMEOUT_S)
                status = once.value if isinstance(once, Retry) else once
            else:
                status, retries = await call_with_retries(partial(self._attempt, body), self.policy)
                self.retries += retries
            self.latencies.append(time.perf_counter() - started)
            self.sent.answer(batch, status)
            self.last_answer = time.monotonic()

    async def recovery_s(self, since: float) -> float | None:
        """Seconds from `since` (monotonic) until one reading is accepted: one try every
        100 ms (each waiting up to 1 s for its answer); None if none within the timeout."""
        device = f"probe-{self.run}-recovery"
        while time.monotonic() - since < RECOVERY_TIMEOUT_S:
            tried = time.monotonic()
            reading = {
                "device_id": device,
                "site_id": self.site,
                "device_type": "meter",
                "ts": self.stamps.iso(self.stamps.take(1)),
                "power_kw": 1.0,
            }
            with contextlib.suppress(OSError, TimeoutError):
                answer = await self.client.post(self.single_head, msgspec.json.encode(reading), 1.0)
                if answer.status == 202:
                    return time.monotonic() - since
            await asyncio.sleep(max(0.0, tried + RECOVERY_INTERVAL_S - time.monotonic()))
        return None


# --- PostgreSQL ----------------------------------------------------------------------------


def _devices(sent: Sent, concurrency: int) -> list[str]:
    return [sent.device(c, d) for c in range(concurrency) for d in range(sent.devices)]


def count_rows(s: Settings, devices: list[str], since: datetime) -> int:
    with psycopg.connect(s.database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM telemetry_readings WHERE device_id = ANY(%s) AND ts >= %s",
            (devices, since),
        ).fetchone()
    return int(row[0]) if row else 0


def stored_identities(s: Settings, devices: list[str], since: datetime) -> list[tuple[str, int]]:
    with psycopg.connect(s.database_url) as conn:
        cur = conn.execute(
            "SELECT device_id, ts FROM telemetry_readings WHERE device_id = ANY(%s) AND ts >= %s",
            (devices, since),
        )
        return [(d, datetime_us(ts)) for d, ts in cur]


async def settle(
    s: Settings, devices: list[str], since: datetime, want: int, timeout_s: float
) -> tuple[int, float]:
    """Wait until the run's rows are at least `want` and their count held still for
    `SETTLED_AFTER_S`, or the timeout; returns the count and the seconds waited."""
    start = time.monotonic()
    rows = await asyncio.to_thread(count_rows, s, devices, since)
    still_since = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if rows >= want and time.monotonic() - still_since >= SETTLED_AFTER_S:
            break
        typer.echo(
            f"\rwaiting for PostgreSQL to settle: {rows:,} rows (202 answered {want:,}),"
            f" {time.monotonic() - start:.0f}/{timeout_s:.0f} s ",
            nl=False,
            err=True,
        )
        await asyncio.sleep(1.0)
        now_rows = await asyncio.to_thread(count_rows, s, devices, since)
        if now_rows != rows:
            rows, still_since = now_rows, time.monotonic()
    typer.echo("", err=True)
    return rows, time.monotonic() - start


# --- the run -------------------------------------------------------------------------------


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.2f} %" if whole else "-"


async def probe(
    s: Settings,
    duration: float,
    concurrency: int,
    readings_per_batch: int,
    devices_per_batch: int,
    retry_deadline_s: float | None,
    settle_timeout_s: float,
) -> bool:
    run = uuid.uuid4().hex[:8]
    with psycopg.connect(s.database_url, autocommit=True) as conn:
        key = create_key(conn, f"probe-{run}")
    p = Probe(s, run, key, readings_per_batch, devices_per_batch, retry_deadline_s)
    mode = "no retries" if retry_deadline_s is None else f"retry until {retry_deadline_s:g} s"
    typer.echo(
        f"run {run}: {concurrency} clients x {readings_per_batch} readings per batch"
        f" ({p.sent.devices} devices each), {duration:g} s, {mode}",
        err=True,
    )
    since = datetime.now(UTC) - timedelta(seconds=1)
    memory = GatewayMemory(s.gateway_port)
    sampler = asyncio.create_task(memory.run())
    start = time.monotonic()
    until = start + duration
    clients = asyncio.gather(*(p.client_loop(c, until) for c in range(concurrency)))

    async def progress() -> None:
        while True:
            await asyncio.sleep(2.0)
            answered = p.sent.readings_by_answer()
            typer.echo(
                f"\r{time.monotonic() - start:5.0f}s batches {len(p.sent.firsts):,}"
                f" readings 202 {answered['202']:,} refused {answered['503'] + answered['429']:,}"
                f" other {answered['other']:,} retries {p.retries:,} ",
                nl=False,
                err=True,
            )

    ticker = asyncio.create_task(progress())
    await asyncio.sleep(max(0.0, until - time.monotonic()))
    stopped = time.monotonic()
    recovery = await p.recovery_s(stopped)
    await clients
    ticker.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ticker
    elapsed = p.last_answer - start
    typer.echo("", err=True)

    answered = p.sent.readings_by_answer()
    devices = _devices(p.sent, concurrency)
    rows, waited = await settle(s, devices, since, answered["202"], settle_timeout_s)
    sampler.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampler
    memory.sample()
    stored = await asyncio.to_thread(stored_identities, s, devices, since)
    c = p.sent.compare(stored)
    await p.client.close()

    sent, distinct = p.sent.readings, p.sent.distinct_identities()
    refused = answered["503"] + answered["429"]
    out = typer.echo
    out(f"run {run} ({mode}), devices probe-{run}-<client>-<device>")
    out(
        f"requests: {len(p.sent.firsts):,} batches, {sum(p.attempts.values()):,} sent"
        f" ({p.retries:,} resends); by status: "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(p.attempts.items()))
    )
    out(
        f"readings sent {sent:,} (distinct identities {distinct:,}); final answer: "
        + ", ".join(f"{k} {v:,}" for k, v in answered.items())
    )
    out(
        f"accepted {answered['202'] / elapsed * 60:,.0f} readings/min over {elapsed:.1f} s;"
        f" batch latency to the final answer {quantiles_ms(p.latencies)}"
    )
    out(
        f"readings stored (rows of this run's devices): {rows:,} after {waited:.1f} s of"
        f" waiting; by final answer: "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(c.by_answer.items()))
        + f"; rows repeating an identity {c.duplicates:,}; rows no batch sent {c.unknown:,}"
    )
    out(f"accepted (202) but not stored: {max(0, answered['202'] - c.by_answer['202']):,}")
    ok = c.duplicates == 0 and c.unknown == 0 and c.by_answer["202"] == answered["202"]
    if retry_deadline_s is None:
        out(
            f"answered 503/429 but in PostgreSQL all the same: {c.refused_but_stored:,}"
            f" of {refused:,} refused ({_pct(c.refused_but_stored, refused)})"
        )
    else:
        same = c.rows == distinct == sent
        ok = ok and same
        out(
            f"rows == distinct identities == readings sent: {c.rows:,} == {distinct:,} =="
            f" {sent:,}: {'yes' if same else 'NO'}"
            + ("" if answered["202"] == sent else f" ({sent - answered['202']:,} not 202)")
        )
    out(memory.summary())
    out(
        "a single reading accepted again "
        + ("never (within 120 s)" if recovery is None else f"{recovery:.2f} s")
        + f" after the load stopped (the last batch was answered"
        f" {max(0.0, p.last_answer - stopped):.2f} s after it)"
    )
    return ok


def main(
    duration: Annotated[float, typer.Option(min=1, max=3600, help="seconds of load")] = 20,
    concurrency: Annotated[int, typer.Option(min=1, max=256, help="closed-loop clients")] = 64,
    readings_per_batch: Annotated[int, typer.Option(min=1, max=1000)] = 100,
    devices_per_batch: Annotated[
        int, typer.Option(min=1, max=1000, help="devices per client (readings spread over)")
    ] = 10,
    retry: Annotated[
        bool, typer.Option(help="resend after 503/429, timeouts and connection errors")
    ] = False,
    retry_deadline: Annotated[
        float, typer.Option(min=1, help="with --retry: give a batch up this long after its start")
    ] = 30.0,
    settle_timeout: Annotated[
        float, typer.Option(min=1, help="seconds to wait for PostgreSQL after the load")
    ] = 120.0,
) -> None:
    ok = asyncio.run(
        probe(
            get_settings(),
            duration,
            concurrency,
            readings_per_batch,
            devices_per_batch,
            retry_deadline if retry else None,
            settle_timeout,
        )
    )
    if not ok:
        raise typer.Exit(1)


if __name__ == "__main__":
    typer.run(main)
