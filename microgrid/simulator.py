"""Simulated microgrid sites sending telemetry to the ingest gateway.

The device models are pure and deterministic given their `random.Random`: a reading depends only
on the timestamps it is asked for. Sign conventions for `power_kw`: PV and genset report what they
produce (>= 0), a load what it consumes (> 0), a battery is positive while charging (its SOC rises)
and negative while discharging, and the meter reports the site's net import from the grid.

Every value stays inside the contract's physical ranges. Outside excursions the values also stay
inside `NORMAL_BANDS`; an excursion (probability `excursion_prob` per reading) drives one metric
out of its band, still physically plausible, for `EXCURSION_SECONDS`.

Devices execute control commands (`Device.execute`, see `contracts.control.COMMANDS`): a
battery follows a charge/discharge setpoint, a genset can be forced to run or stop, a PV inverter
can be curtailed, and any device can be rebooted (it then reports nothing for a few seconds). A
small share of commands fails with a reason, as real devices do.

`run_simulation` runs a fleet in real time: one ingest key and one batch request per site per
tick, on absolute tick times, retrying 503/429 after Retry-After and network errors with backoff.
Alongside, `serve_commands` executes the commands the platform dispatches on `control.dispatch`
to the fleet's devices and replies on `control.results`, as devices with a Kafka client do.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import itertools
import logging
import math
import random
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, ClassVar, Final, TypeVar, get_args

import httpx
import msgspec
import psycopg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.errors import KafkaConnectionError, KafkaError

from contracts.control import CommandDispatch, CommandResult, command_errors
from contracts.readings import (
    Current,
    DeviceType,
    Frequency,
    Power,
    Reading,
    ReadingBatch,
    StateOfCharge,
    Temperature,
    Voltage,
)
from contracts.topics import Groups, Topics
from ingest_gateway.keys import create_key
from microgrid.kafka import reliable_producer
from microgrid.settings import Settings

log = logging.getLogger("microgrid.simulator")

NOMINAL_VOLTAGE_V: Final = 230.0
NOMINAL_FREQUENCY_HZ: Final = 50.0
EXCURSION_PROBABILITY: Final = 1 / 2000
EXCURSION_SECONDS: Final = (30.0, 300.0)
BATCH_PATH: Final = "/api/v1/telemetry/batch"
MAX_RETRIES: Final = 5
MAX_RETRY_AFTER_S: Final = 60.0
PROGRESS_INTERVAL_S: Final = 10.0
# Control commands
COMMAND_FAILURE_RATE: Final = 0.03  # share of valid commands a device refuses
COMMAND_DELAY_S: Final = (0.1, 0.8)  # from receipt to execution and reply
REBOOT_SECONDS: Final = (5.0, 10.0)  # a rebooting device reports nothing for this long
REBOOTING: Final = "device is rebooting"

Metrics = dict[str, float | None]


def _bounds(annotated: Any) -> tuple[float, float]:
    meta = next(m for m in get_args(annotated)[1:] if isinstance(m, msgspec.Meta))
    assert meta.ge is not None and meta.le is not None
    return float(meta.ge), float(meta.le)


PHYSICAL_RANGES: Final[dict[str, tuple[float, float]]] = {
    "voltage_v": _bounds(Voltage),
    "current_a": _bounds(Current),
    "frequency_hz": _bounds(Frequency),
    "power_kw": _bounds(Power),
    "soc_pct": _bounds(StateOfCharge),
    "temperature_c": _bounds(Temperature),
}
# Normal operating bands: outside them only during an excursion (a stopped genset reports no
# voltage or frequency at all).
NORMAL_BANDS: Final[dict[str, tuple[float, float]]] = {
    "voltage_v": (0.9 * NOMINAL_VOLTAGE_V, 1.1 * NOMINAL_VOLTAGE_V),
    "frequency_hz": (49.5, 50.5),
    "temperature_c": (-20.0, 75.0),
    "soc_pct": (10.0, 100.0),
}


@dataclass(frozen=True)
class ExcursionKind:
    metric: str
    low: float
    high: float
    jitter: float  # uniform, bounded: the value never drifts back into the normal band


EXCURSIONS: Final[dict[str, ExcursionKind]] = {
    "over_temperature": ExcursionKind("temperature_c", 80.0, 95.0, 0.5),
    "voltage_sag": ExcursionKind(
        "voltage_v", 0.78 * NOMINAL_VOLTAGE_V, 0.88 * NOMINAL_VOLTAGE_V, 1
    ),
    "voltage_swell": ExcursionKind(
        "voltage_v", 1.12 * NOMINAL_VOLTAGE_V, 1.2 * NOMINAL_VOLTAGE_V, 1
    ),
    "frequency_low": ExcursionKind("frequency_hz", 48.7, 48.9, 0.02),
    "frequency_high": ExcursionKind("frequency_hz", 51.1, 51.3, 0.02),
    "soc_low": ExcursionKind("soc_pct", 2.0, 9.0, 0.3),
}
GRID_EXCURSIONS: Final = ("voltage_sag", "voltage_swell", "frequency_low", "frequency_high")


@dataclass
class Excursion:
    kind: ExcursionKind
    target: float
    until: datetime


def local_hour(ts: datetime, tz: tzinfo) -> float:
    """Fractional hour of the day of `ts` in `tz` (0 <= h < 24)."""
    if ts.tzinfo is None:
        raise ValueError("reading timestamps must be timezone-aware")
    t = ts.astimezone(tz)
    return t.hour + t.minute / 60 + t.second / 3600 + t.microsecond / 3.6e9


def solar_curve(hour: float) -> float:
    """Clear-sky output as a fraction of rating: 0 at night, a bell between 6 h and 18 h."""
    if not 6.0 < hour < 18.0:
        return 0.0
    return math.sin(math.pi * (hour - 6.0) / 12.0) ** 1.5


def _bump(hour: float, center: float, width: float) -> float:
    return math.exp(-(((hour - center) / width) ** 2))


def load_profile(hour: float) -> float:
    """Daily consumption as a fraction of the peak: night base, morning and evening peaks."""
    return (
        0.4
        + 0.3 * _bump(hour, 8.0, 1.5)
        + 0.1 * _bump(hour, 13.0, 3.0)
        + 0.5 * _bump(hour, 19.5, 2.0)
    )


def _clamp(value: float, low: float, high: float) -> float:
    return min(high, max(low, value))


class Device:
    """One simulated device. Subclasses compute their metrics in `_metrics` and apply their own
    control commands in `_apply` (`reboot` is common to all and handled here)."""

    device_type: ClassVar[DeviceType]
    excursion_kinds: ClassVar[tuple[str, ...]] = GRID_EXCURSIONS
    net_sign: ClassVar[float] = 0.0  # contribution of power_kw to the site's grid import
    FAILURE_REASONS: ClassVar[tuple[str, ...]] = ("device busy", "interlock active")

    def __init__(
        self,
        device_id: str,
        site_id: str,
        rng: random.Random,
        *,
        excursion_prob: float = EXCURSION_PROBABILITY,
        tz: tzinfo = UTC,
    ) -> None:
        self.device_id = device_id
        self.site_id = site_id
        self.rng = rng
        self.excursion_prob = excursion_prob
        self.tz = tz
        self.seq = 0
        self.last_power_kw = 0.0
        self.excursion: Excursion | None = None
        self.failure_rate = COMMAND_FAILURE_RATE
        self.rebooting_until: datetime | None = None
        self._reboot_pending_s: float | None = None  # a reboot not yet placed in time
        self._last_ts: datetime | None = None

    # --- control commands ---

    def execute(
        self,
        command: str,
        params: dict[str, Any],
        rng: random.Random | None = None,
        *,
        now: datetime | None = None,
    ) -> str | None:
        """Execute a control command; None on success, else the reason it failed.

        No I/O and no clock: `rng` (default: the device's own) decides whether the device
        refuses a valid command (probability `failure_rate`) and how long a reboot takes; `now`
        places a reboot in time (without it the reboot starts at the next reading's timestamp).
        The command's effect shows in the following readings. A rebooting device refuses every
        command.
        """
        rng = self.rng if rng is None else rng
        errors = command_errors(self.device_type, command, params)
        if errors:
            return "; ".join(f"{e['field']}: {e['message']}" for e in errors)[:500]
        if self._reboot_pending_s is not None or (now is not None and self.is_rebooting(now)):
            return REBOOTING
        if rng.random() < self.failure_rate:
            return rng.choice(self.FAILURE_REASONS)
        if command == "reboot":
            self._reset()
            seconds = rng.uniform(*REBOOT_SECONDS)
            if now is None:
                self._reboot_pending_s = seconds
            else:
                self.rebooting_until = now + timedelta(seconds=seconds)
        else:
            self._apply(command, params)
        return None

    def _apply(self, command: str, params: dict[str, Any]) -> None:
        """Apply a validated command of this device type (other than `reboot`)."""
        raise NotImplementedError(command)  # command_errors() lets no other command through

    def _reset(self) -> None:
        """Forget every setpoint and override, as a reboot does."""

    def is_rebooting(self, ts: datetime) -> bool:
        if self._reboot_pending_s is not None:
            self.rebooting_until = ts + timedelta(seconds=self._reboot_pending_s)
            self._reboot_pending_s = None
        if self.rebooting_until is None:
            return False
        if ts < self.rebooting_until:
            return True
        self.rebooting_until = None
        return False

    def sample(self, ts: datetime) -> Reading | None:
        """The reading at `ts`, or None while the device reboots (it reports nothing, produces
        and consumes nothing, and its next reading integrates only from the reboot's end)."""
        if self.is_rebooting(ts):
            self.last_power_kw = 0.0
            self._last_ts = ts
            return None
        return self.reading(ts)

    # --- readings ---

    def reading(self, ts: datetime) -> Reading:
        hour = local_hour(ts, self.tz)
        dt_s = 0.0 if self._last_ts is None else max(0.0, (ts - self._last_ts).total_seconds())
        self._last_ts = ts
        m = self._metrics(hour, dt_s)
        self.last_power_kw = m.get("power_kw") or 0.0
        self._apply_excursion(ts, m)
        reading = _build_reading(self, ts, m)
        self.seq += 1
        return reading

    def _metrics(self, hour: float, dt_s: float) -> Metrics:
        raise NotImplementedError

    def _grid(self) -> Metrics:
        """AC voltage and frequency as measured at the device's terminals."""
        return {
            "voltage_v": NOMINAL_VOLTAGE_V + self.rng.uniform(-4.0, 4.0),
            "frequency_hz": NOMINAL_FREQUENCY_HZ + self.rng.uniform(-0.05, 0.05),
        }

    def _apply_excursion(self, ts: datetime, m: Metrics) -> None:
        if self.excursion is not None and ts >= self.excursion.until:
            self.excursion = None
        if self.excursion is None and self.rng.random() < self.excursion_prob:
            self.excursion = self._start_excursion(ts)
        ex = self.excursion
        if ex is not None and m.get(ex.kind.metric) is not None:
            m[ex.kind.metric] = ex.target + self.rng.uniform(-ex.kind.jitter, ex.kind.jitter)

    def _start_excursion(self, ts: datetime) -> Excursion:
        kind = EXCURSIONS[self.rng.choice(self.excursion_kinds)]
        target = self.rng.uniform(kind.low, kind.high)
        until = ts + timedelta(seconds=self.rng.uniform(*EXCURSION_SECONDS))
        return Excursion(kind, target, until)


def _build_reading(device: Device, ts: datetime, m: Metrics) -> Reading:
    voltage, power = m.get("voltage_v"), m.get("power_kw")
    if voltage and power is not None:
        m["current_a"] = power * 1000.0 / voltage
    v: Metrics = {}
    for metric, value in m.items():
        low, high = PHYSICAL_RANGES[metric]
        v[metric] = None if value is None else round(_clamp(value, low, high), 3)
    return Reading(
        device_id=device.device_id,
        site_id=device.site_id,
        device_type=device.device_type,
        ts=ts,
        seq=device.seq,
        voltage_v=v.get("voltage_v"),
        current_a=v.get("current_a"),
        frequency_hz=v.get("frequency_hz"),
        power_kw=v.get("power_kw"),
        soc_pct=v.get("soc_pct"),
        temperature_c=v.get("temperature_c"),
    )


class PVInverter(Device):
    device_type = "pv_inverter"
    excursion_kinds = ("over_temperature", *GRID_EXCURSIONS)
    net_sign = -1.0

    def __init__(self, device_id: str, site_id: str, rng: random.Random, **kw: Any) -> None:
        super().__init__(device_id, site_id, rng, **kw)
        self.rated_kw = rng.uniform(10.0, 50.0)
        self.cloud = rng.uniform(0.6, 1.0)
        self.limit_pct: float | None = None  # curtailment: output cap in % of rated power

    def _apply(self, command: str, params: dict[str, Any]) -> None:
        assert command == "limit_power"
        self.limit_pct = float(params["limit_pct"])

    def _reset(self) -> None:
        self.limit_pct = None

    def _metrics(self, hour: float, dt_s: float) -> Metrics:
        # Mean-reverting cloud cover: 1 is clear sky.
        self.cloud = _clamp(
            self.cloud + 0.1 * (0.85 - self.cloud) + self.rng.gauss(0, 0.05), 0.2, 1.0
        )
        power = self.rated_kw * solar_curve(hour) * self.cloud
        if self.limit_pct is not None:
            power = min(power, self.rated_kw * self.limit_pct / 100.0)
        ambient = 15.0 + 10.0 * solar_curve(hour)
        temperature = ambient + 30.0 * power / self.rated_kw + self.rng.uniform(-1.0, 1.0)
        return {**self._grid(), "power_kw": power, "temperature_c": temperature}


class Battery(Device):
    """Follows a daily schedule, or `setpoint_kw` when one is set (by `charge`/`discharge`).

    Sign convention: power is positive while charging (the SOC rises) and negative while
    discharging, so `charge` with power_kw=P sets the setpoint to +P and `discharge` to -P. The
    reported power follows the setpoint, clamped to the rating, and drops to 0 at 100 % (charging)
    or 0 % (discharging) SOC.
    """

    device_type = "battery"
    excursion_kinds = ("over_temperature", "soc_low", *GRID_EXCURSIONS)
    net_sign = 1.0
    SOC_LIMITS: ClassVar[tuple[float, float]] = (15.0, 95.0)  # the schedule's own limits
    FAILURE_REASONS = (*Device.FAILURE_REASONS, "setpoint rejected by BMS")

    def __init__(self, device_id: str, site_id: str, rng: random.Random, **kw: Any) -> None:
        super().__init__(device_id, site_id, rng, **kw)
        self.capacity_kwh = rng.uniform(50.0, 200.0)
        self.max_power_kw = self.capacity_kwh * rng.uniform(0.25, 0.5)
        self.soc_pct = rng.uniform(40.0, 80.0)
        self.setpoint_kw: float | None = None

    def _apply(self, command: str, params: dict[str, Any]) -> None:
        assert command in ("charge", "discharge")
        power = float(params["power_kw"])
        self.setpoint_kw = power if command == "charge" else -power

    def _reset(self) -> None:
        self.setpoint_kw = None

    def _scheduled_kw(self, hour: float) -> float:
        if 9.0 <= hour < 15.0:
            frac = 0.5 * math.sin(math.pi * (hour - 9.0) / 6.0)
        elif 17.0 <= hour < 22.0:
            frac = -0.6 * math.sin(math.pi * (hour - 17.0) / 5.0)
        else:
            frac = self.rng.uniform(-0.02, 0.02)
        power = self.max_power_kw * frac * (1.0 + self.rng.uniform(-0.05, 0.05))
        low, high = self.SOC_LIMITS
        if (power > 0 and self.soc_pct >= high) or (power < 0 and self.soc_pct <= low):
            return 0.0
        return power

    def _power_kw(self, hour: float) -> float:
        if self.setpoint_kw is None:
            return self._scheduled_kw(hour)
        power = _clamp(self.setpoint_kw, -self.max_power_kw, self.max_power_kw)
        if (power > 0 and self.soc_pct >= 100.0) or (power < 0 and self.soc_pct <= 0.0):
            return 0.0
        return power

    def _integrate(self, power: float, dt_s: float) -> float:
        """SOC after `power` for `dt_s`; on schedule it stops at the schedule's limits."""
        soc = self.soc_pct + power * dt_s / 3600.0 / self.capacity_kwh * 100.0
        if self.setpoint_kw is None:
            low, high = self.SOC_LIMITS
            soc = (
                max(soc, min(self.soc_pct, low)) if power < 0 else min(soc, max(self.soc_pct, high))
            )
        return _clamp(soc, 0.0, 100.0)

    def _metrics(self, hour: float, dt_s: float) -> Metrics:
        power = self._power_kw(hour)
        self.soc_pct = self._integrate(power, dt_s)
        temperature = 22.0 + 15.0 * abs(power) / self.max_power_kw + self.rng.uniform(-1.0, 1.0)
        return {
            **self._grid(),
            "power_kw": power,
            "soc_pct": self.soc_pct,
            "temperature_c": temperature,
        }


class Load(Device):
    device_type = "load"
    net_sign = 1.0

    def __init__(self, device_id: str, site_id: str, rng: random.Random, **kw: Any) -> None:
        super().__init__(device_id, site_id, rng, **kw)
        self.peak_kw = rng.uniform(5.0, 40.0)

    def _metrics(self, hour: float, dt_s: float) -> Metrics:
        power = self.peak_kw * load_profile(hour) * (1.0 + self.rng.gauss(0, 0.05))
        return {**self._grid(), "power_kw": max(0.1, power)}


class Genset(Device):
    """Runs while the site's batteries are low (start < 20 %, stop >= 40 %) or on a random run,
    unless a `start` or `stop` command forces it (until the opposite command or a reboot)."""

    device_type = "genset"
    excursion_kinds = ("over_temperature", *GRID_EXCURSIONS)
    net_sign = -1.0
    RANDOM_STARTS_PER_S: ClassVar[float] = 1 / (8 * 3600)
    SOC_START, SOC_STOP = 20.0, 40.0

    def __init__(self, device_id: str, site_id: str, rng: random.Random, **kw: Any) -> None:
        super().__init__(device_id, site_id, rng, **kw)
        self.rated_kw = rng.uniform(30.0, 80.0)
        self.batteries: list[Battery] = []
        self.soc_low = False
        self.run_left_s = 0.0
        self.forced: bool | None = None  # True: started, False: stopped by command

    @property
    def running(self) -> bool:
        if self.forced is not None:
            return self.forced
        return self.soc_low or self.run_left_s > 0

    def _apply(self, command: str, params: dict[str, Any]) -> None:
        assert command in ("start", "stop")
        self.forced = command == "start"
        self.run_left_s = 0.0  # a random run does not outlast an override

    def _reset(self) -> None:
        self.forced = None
        self.run_left_s = 0.0

    def _update(self, dt_s: float) -> None:
        self.run_left_s = max(0.0, self.run_left_s - dt_s)
        if self.batteries:
            soc = sum(b.soc_pct for b in self.batteries) / len(self.batteries)
            self.soc_low = soc < (self.SOC_STOP if self.soc_low else self.SOC_START)
        starts = self.rng.random() < min(1.0, dt_s * self.RANDOM_STARTS_PER_S)
        if starts and not self.running:
            self.run_left_s = self.rng.uniform(600.0, 1800.0)

    def _metrics(self, hour: float, dt_s: float) -> Metrics:
        self._update(dt_s)
        if not self.running:
            return {"power_kw": 0.0, "temperature_c": 25.0 + self.rng.uniform(-2.0, 2.0)}
        power = self.rated_kw * self.rng.uniform(0.4, 0.8)
        temperature = 60.0 + 8.0 * power / self.rated_kw + self.rng.uniform(-2.0, 2.0)
        return {**self._grid(), "power_kw": power, "temperature_c": temperature}


class Meter(Device):
    """The site's grid connection: net import of its other devices (their latest readings)."""

    device_type = "meter"

    def __init__(self, device_id: str, site_id: str, rng: random.Random, **kw: Any) -> None:
        super().__init__(device_id, site_id, rng, **kw)
        self.peers: list[Device] = []

    def _metrics(self, hour: float, dt_s: float) -> Metrics:
        net = sum(p.net_sign * p.last_power_kw for p in self.peers)
        return {**self._grid(), "power_kw": net}


DEVICE_CLASSES: Final[dict[str, type[Device]]] = {
    "pv_inverter": PVInverter,
    "battery": Battery,
    "load": Load,
    "genset": Genset,
    "meter": Meter,
}
# Which devices a site of k devices has: the first k of this list (7: 2 pv, 1 battery, 2 load,
# 1 genset, 1 meter; 9 adds a third pv and a second battery); larger sites add pv and load.
_SITE_ORDER: Final = (
    "pv_inverter",
    "battery",
    "load",
    "meter",
    "genset",
    "load",
    "pv_inverter",
    "pv_inverter",
    "battery",
)
# Order in which a site takes its readings, so that the genset and meter see fresh values.
_READ_ORDER: Final = ("pv_inverter", "battery", "load", "genset", "meter")


@dataclass
class Site:
    site_id: str
    devices: list[Device]

    def __post_init__(self) -> None:
        self.devices.sort(key=lambda d: _READ_ORDER.index(d.device_type))
        batteries = [d for d in self.devices if isinstance(d, Battery)]
        for d in self.devices:
            if isinstance(d, Genset):
                d.batteries = batteries
            elif isinstance(d, Meter):
                d.peers = [p for p in self.devices if p is not d]

    def readings(self, ts: datetime) -> list[Reading]:
        """The readings of every device at `ts`, except those rebooting."""
        return [r for d in self.devices if (r := d.sample(ts)) is not None]


def site_composition(n: int, rng: random.Random) -> list[str]:
    """Device types of a site of `n` devices (about 8: 2-3 pv, 1-2 battery, 2 load, 1 genset,
    1 meter)."""
    order = list(_SITE_ORDER)
    if n == 8 and rng.random() < 0.5:
        order[7] = "battery"  # 2 pv + 2 batteries instead of 3 pv + 1
    extra = ["pv_inverter" if i % 2 == 0 else "load" for i in range(max(0, n - len(order)))]
    return (order + extra)[:n]


def _site_sizes(n_devices: int) -> list[int]:
    n_sites = max(1, round(n_devices / 8))
    base, rest = divmod(n_devices, n_sites)
    return [base + 1 if i < rest else base for i in range(n_sites)]


def build_fleet(
    n_devices: int,
    seed: int = 0,
    *,
    excursion_prob: float = EXCURSION_PROBABILITY,
    tz: tzinfo = UTC,
) -> list[Site]:
    """Sites `site-001`, `site-002`, ... of about 8 devices each, exactly `n_devices` in all."""
    if n_devices < 1:
        raise ValueError("n_devices must be at least 1")
    rng = random.Random(seed)
    sites = []
    for i, size in enumerate(_site_sizes(n_devices), start=1):
        site_id = f"site-{i:03d}"
        counts: dict[str, int] = {}
        devices: list[Device] = []
        for device_type in site_composition(size, rng):
            counts[device_type] = counts.get(device_type, 0) + 1
            device_id = f"{site_id}-{device_type}-{counts[device_type]}"
            device_rng = random.Random(f"{seed}/{device_id}")
            cls = DEVICE_CLASSES[device_type]
            devices.append(
                cls(device_id, site_id, device_rng, excursion_prob=excursion_prob, tz=tz)
            )
        sites.append(Site(site_id, devices))
    return sites


# --- Sending to the gateway -----------------------------------------------------------------


@dataclass
class SimulationStats:
    attempted: int = 0  # readings put into a request (each counted once, however often resent)
    accepted: int = 0
    failed: int = 0
    retried: int = 0  # requests resent
    skipped: int = 0  # readings not sampled because the site was still sending its last batch


def retry_after_s(value: str | None, default: float) -> float:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date)."""
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return default
        seconds = (when - datetime.now(UTC)).total_seconds()
    return _clamp(seconds, 0.0, MAX_RETRY_AFTER_S)


def backoff_s(attempt: int, rng: random.Random) -> float:
    return min(10.0, 0.5 * 2.0**attempt) * rng.uniform(0.8, 1.2)


def _chunks(items: list[Reading], size: int) -> Iterator[list[Reading]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Sender:
    """Posts batches for every site over one client, retrying what may succeed later."""

    def __init__(
        self, client: httpx.AsyncClient, url: str, stats: SimulationStats, max_batch: int
    ) -> None:
        self.client = client
        self.url = url
        self.stats = stats
        self.max_batch = max_batch
        self.rng = random.Random()
        self._logged: set[str] = set()

    async def send(self, key: str, readings: list[Reading]) -> None:
        for chunk in _chunks(readings, self.max_batch):
            await self._send_batch(key, chunk)

    async def _send_batch(self, key: str, readings: list[Reading]) -> None:
        body = msgspec.json.encode(ReadingBatch(readings=readings))
        n = len(readings)
        self.stats.attempted += n
        for attempt in range(MAX_RETRIES + 1):
            if attempt:
                self.stats.retried += 1
            delay = await self._attempt(key, body, n, attempt)
            if delay is None:
                return
            if attempt < MAX_RETRIES:
                await asyncio.sleep(delay)
        self.stats.failed += n
        log.warning("gave up on a batch of %d readings after %d retries", n, MAX_RETRIES)

    async def _attempt(self, key: str, body: bytes, n: int, attempt: int) -> float | None:
        """One request; None when done (accepted or refused for good), else seconds to wait."""
        headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        try:
            resp = await self.client.post(self.url, content=body, headers=headers)
        except httpx.TransportError as exc:
            self._log_once(type(exc).__name__, "cannot reach the gateway at %s: %r", self.url, exc)
            return backoff_s(attempt, self.rng)
        return self._outcome(resp, n, attempt)

    def _outcome(self, resp: httpx.Response, n: int, attempt: int) -> float | None:
        status = resp.status_code
        if resp.is_success:
            self.stats.accepted += _accepted_count(resp, n)
            return None
        if status in (429, 503):
            return retry_after_s(resp.headers.get("retry-after"), backoff_s(attempt, self.rng))
        detail = _problem_detail(resp)
        self._log_once(f"status {status}", "gateway answered %d: %s", status, detail)
        if status >= 500:
            return backoff_s(attempt, self.rng)
        self.stats.failed += n
        return None

    def _log_once(self, what: str, message: str, *args: object) -> None:
        if what not in self._logged:
            self._logged.add(what)
            log.warning(message + " (logged once)", *args)


def _accepted_count(resp: httpx.Response, n: int) -> int:
    try:
        return int(resp.json()["accepted"])
    except (ValueError, KeyError, TypeError):
        return n


def _problem_detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:200]
    if not isinstance(body, dict):
        return str(body)[:200]
    return f"{body.get('title', '')}: {body.get('detail', '')}"


def _provision_keys(database_url: str, site_ids: list[str]) -> dict[str, str]:
    with psycopg.connect(database_url, autocommit=True) as conn:
        return {site_id: create_key(conn, site_id) for site_id in site_ids}


def _make_client(n_sites: int) -> httpx.AsyncClient:
    # Each site has at most one request in flight.
    limits = httpx.Limits(max_connections=n_sites + 2, max_keepalive_connections=n_sites + 2)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(10.0, connect=5.0))


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


# --- Executing control commands --------------------------------------------------------------

SEEN_COMMANDS: Final = 10_000  # command ids remembered, so that a redelivery is not re-executed
_dispatch_decoder = msgspec.json.Decoder(CommandDispatch)


KafkaClient = TypeVar("KafkaClient", AIOKafkaConsumer, AIOKafkaProducer)


def _aware(ts: datetime) -> datetime:
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


class CommandServer:
    """Executes the dispatched commands of the devices it owns, one task per command."""

    def __init__(self, sites: list[Site], producer: AIOKafkaProducer, results_topic: str) -> None:
        self.devices = {d.device_id: d for site in sites for d in site.devices}
        self.producer = producer
        self.results_topic = results_topic
        self.rng = random.Random()  # delays only; outcomes come from the devices' rngs
        self.tasks: set[asyncio.Task[None]] = set()
        self._seen: set[str] = set()
        self._seen_order: deque[str] = deque()

    def accept(self, record: ConsumerRecord[bytes, bytes]) -> CommandDispatch | None:
        """The dispatch in `record`, if it is new, for one of our devices and not yet overdue."""
        if record.value is None:
            return None
        try:
            dispatch = _dispatch_decoder.decode(record.value)
        except msgspec.DecodeError as exc:
            log.warning(
                "undecodable dispatch at %s/%d@%d: %s",
                record.topic,
                record.partition,
                record.offset,
                exc,
            )
            return None
        if dispatch.device_id not in self.devices or dispatch.id in self._seen:
            return None
        if _aware(dispatch.deadline) <= datetime.now(UTC):
            log.info("ignored command %s for %s: deadline passed", dispatch.id, dispatch.device_id)
            return None
        self._seen.add(dispatch.id)
        self._seen_order.append(dispatch.id)
        if len(self._seen_order) > SEEN_COMMANDS:
            self._seen.discard(self._seen_order.popleft())
        return dispatch

    def submit(self, dispatch: CommandDispatch) -> None:
        task = asyncio.create_task(self.run(dispatch, self.rng.uniform(*COMMAND_DELAY_S)))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self, dispatch: CommandDispatch, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        now = datetime.now(UTC)
        if _aware(dispatch.deadline) <= now:
            log.info("ignored command %s for %s: deadline passed", dispatch.id, dispatch.device_id)
            return
        device = self.devices[dispatch.device_id]
        reason = device.execute(dispatch.command, dispatch.params, device.rng, now=now)
        result = CommandResult(
            id=dispatch.id,
            device_id=dispatch.device_id,
            status="succeeded" if reason is None else "failed",
            reason=reason or "",
        )
        log.info(
            "executed %s %s on %s: %s%s",
            dispatch.command,
            dispatch.params,
            dispatch.device_id,
            result.status,
            f" ({reason})" if reason else "",
            extra={"command_id": dispatch.id},
        )
        try:
            await self.producer.send_and_wait(
                self.results_topic,
                msgspec.json.encode(result),
                key=dispatch.device_id.encode(),
            )
        except KafkaError as exc:  # the platform times the command out
            log.warning("could not send the result of command %s: %r", dispatch.id, exc)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def _start_when_reachable(
    make: Callable[[], KafkaClient], stop: asyncio.Event
) -> KafkaClient | None:
    """A started client from `make`, retrying while the broker is unreachable; None if `stop`
    is set first."""
    for attempt in itertools.count():
        client = make()
        try:
            await client.start()
            return client
        except KafkaConnectionError as exc:
            with contextlib.suppress(Exception):
                await client.stop()
            if attempt == 0:
                log.warning("cannot reach Kafka for control commands, retrying: %r", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=min(30.0, 2.0 * 2**attempt))
        if stop.is_set():
            return None
    raise AssertionError("unreachable")


async def _resolve_positions(consumer: AIOKafkaConsumer) -> bool:
    """Once partitions are assigned, fix their positions (so that "latest" means now)."""
    assignment = consumer.assignment()
    for tp in assignment:
        await consumer.position(tp)
    return bool(assignment)


async def serve_commands(
    s: Settings,
    sites: list[Site],
    stop: asyncio.Event | None = None,
    *,
    ready: asyncio.Event | None = None,
) -> None:
    """Execute the commands dispatched to the devices of `sites` until `stop` is set (or the task
    is cancelled), as devices with a Kafka client do: each after a short delay, each reported on
    `control.results` keyed by device id. Dispatches to other devices, or past their deadline,
    are ignored. A new consumer group starts at the log's end, so old commands are not executed.
    `ready` is set once the consumer has partitions and their positions."""
    stop = stop or asyncio.Event()
    # a group of its own: each simulator sees every dispatch and keeps those for its fleet
    group = f"{s.group(Groups.SIMULATOR)}.{uuid.uuid4().hex[:8]}"

    def make_consumer() -> AIOKafkaConsumer:
        return AIOKafkaConsumer(
            s.topic(Topics.CONTROL_DISPATCH),
            bootstrap_servers=s.kafka_bootstrap_servers,
            group_id=group,
            client_id="microgrid-simulator",
            auto_offset_reset="latest",
            enable_auto_commit=True,
            metadata_max_age_ms=30_000,  # soon notice a dispatch topic created after the start
        )

    producer = await _start_when_reachable(
        lambda: reliable_producer(s, client_id="microgrid-simulator-results"), stop
    )
    if producer is None:
        return
    server = CommandServer(sites, producer, s.topic(Topics.CONTROL_RESULTS))
    consumer: AIOKafkaConsumer | None = None
    try:
        consumer = await _start_when_reachable(make_consumer, stop)
        if consumer is None:
            return
        log.info(
            "executing control commands for %d devices from %s",
            len(server.devices),
            s.topic(Topics.CONTROL_DISPATCH),
        )
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for record in records:
                    dispatch = server.accept(record)
                    if dispatch is not None:
                        server.submit(dispatch)
            if ready is not None and not ready.is_set() and await _resolve_positions(consumer):
                ready.set()
    finally:
        await server.close()
        for client in (consumer, producer):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.stop()


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
        async with _make_client(len(sites)) as client:
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


__all__ = [
    "DEVICE_CLASSES",
    "EXCURSIONS",
    "NORMAL_BANDS",
    "PHYSICAL_RANGES",
    "Battery",
    "CommandServer",
    "Device",
    "Genset",
    "Load",
    "Meter",
    "PVInverter",
    "Sender",
    "SimulationStats",
    "Site",
    "build_fleet",
    "run_simulation",
    "serve_commands",
]
