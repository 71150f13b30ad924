"""`run_simulation`: a fleet in real time.

One ingest key and one batch request per site per tick, on absolute tick times; alongside,
`serve_commands` executes the commands the platform dispatches to the fleet's devices.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from datetime import UTC, datetime
from typing import Final

import psycopg

from runtime.keys import create_key
from runtime.settings import Settings
from simulator.commands import serve_commands
from simulator.devices import EXCURSION_PROBABILITY
from simulator.fleet import Site, build_fleet
from simulator.sender import Sender, SimulationStats, make_client

log = logging.getLogger("microgrid.simulator")

BATCH_PATH: Final = "/api/v1/telemetry/batch"
PROGRESS_INTERVAL_S: Final = 10.0


def _provision_keys(database_url: str, site_ids: list[str]) -> dict[str, str]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return {site_id: create_key(conn, site_id) for site_id in site_ids}


def _next_tick(tick: int, first: float, period: float, now: float) -> int:
    """The next tick to run: late ticks run at once, but at most one; the others are skipped."""
    return max(tick + 1, math.floor((now - first) / period))


async def _site_loop(
    site: Site, key: str, sender: Sender, first: float, period: float, stop_at: float | None
) -> None:
    loop = asyncio.get_running_loop()
    tick = 0
    while True:
        due = first + tick * period
        if stop_at is not None and due >= stop_at:
            return
        await asyncio.sleep(max(0.0, due - loop.time()))
        await sender.send(key, site.readings(datetime.now(UTC)))
        following = _next_tick(tick, first, period, loop.time())
        sender.stats.skipped += (following - tick - 1) * len(site.devices)
        tick = following


def _progress_line(stats: SimulationStats, rate: float, target: float) -> str:
    line = (
        f"sent {stats.attempted}, accepted {stats.accepted}, failed {stats.failed}, "
        f"retried {stats.retried}; {rate:.1f} readings/s accepted (target {target:.1f}/s)"
    )
    return line + (f"; skipped {stats.skipped} (sending fell behind)" if stats.skipped else "")


async def _report_progress(stats: SimulationStats, target: float) -> None:
    loop = asyncio.get_running_loop()
    last_t, last_accepted = loop.time(), 0
    while True:
        await asyncio.sleep(PROGRESS_INTERVAL_S)
        now = loop.time()
        rate = (stats.accepted - last_accepted) / (now - last_t)
        last_t, last_accepted = now, stats.accepted
        log.info("%s", _progress_line(stats, rate, target))


async def _drive(
    sites: list[Site],
    keys: dict[str, str],
    sender: Sender,
    rate: float,
    duration: float | None,
    seed: int,
) -> None:
    loop = asyncio.get_running_loop()
    period = 1.0 / rate
    t0 = loop.time()
    stop_at = None if duration is None else t0 + duration
    phases = random.Random(seed)
    target = rate * sum(len(site.devices) for site in sites)
    progress = asyncio.create_task(_report_progress(sender.stats, target))
    try:
        async with asyncio.TaskGroup() as tg:
            for site in sites:
                first = t0 + phases.uniform(0.0, period)
                tg.create_task(_site_loop(site, keys[site.site_id], sender, first, period, stop_at))
    finally:
        progress.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await progress


async def _serve_commands_logged(s: Settings, sites: list[Site], stop: asyncio.Event) -> None:
    """`serve_commands` for `run_simulation`: a failure there must not end the readings."""
    try:
        await serve_commands(s, sites, stop)
    except Exception:
        log.exception("executing control commands failed; readings go on without them")


async def _stop_task(task: asyncio.Task[None], stop: asyncio.Event, grace_s: float) -> None:
    stop.set()
    await asyncio.wait({task}, timeout=grace_s)
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def run_simulation(
    s: Settings,
    devices: int,
    rate: float,
    duration: float | None,
    *,
    gateway_url: str | None = None,
    seed: int = 0,
    excursion_prob: float = EXCURSION_PROBABILITY,
    serve_commands: bool = True,
) -> SimulationStats:
    """Simulate `devices` devices, each reporting `rate` readings per second, for `duration`
    seconds (None: until cancelled). Returns the counts, also when cancelled. With
    `serve_commands` the same devices execute the control commands dispatched to them."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    sites = build_fleet(devices, seed, excursion_prob=excursion_prob)
    base = gateway_url or f"http://{s.gateway_host}:{s.gateway_port}"
    url = base.rstrip("/") + BATCH_PATH
    stats = SimulationStats()
    start = asyncio.get_running_loop().time()
    stop_commands = asyncio.Event()
    commands = (
        asyncio.create_task(_serve_commands_logged(s, sites, stop_commands))
        if serve_commands
        else None
    )
    try:
        keys = await asyncio.to_thread(_provision_keys, s.database_url, [x.site_id for x in sites])
        log.info(
            "simulating %d devices in %d sites, %g readings/s each, to %s",
            devices,
            len(sites),
            rate,
            url,
        )
        async with make_client(len(sites)) as client:
            sender = Sender(client, url, stats, s.ingest_max_batch)
            await _drive(sites, keys, sender, rate, duration, seed)
    except (asyncio.CancelledError, KeyboardInterrupt):
        log.info("simulation stopped")
    finally:
        if commands is not None:
            await _stop_task(commands, stop_commands, grace_s=5.0)
    elapsed = max(asyncio.get_running_loop().time() - start, 1e-9)
    log.info("done: %s", _progress_line(stats, stats.accepted / elapsed, rate * devices))
    return stats
