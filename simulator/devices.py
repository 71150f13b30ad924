"""Simulated microgrid devices and their physics.

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
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, ClassVar, Final

from contracts.control import command_errors
from contracts.readings import METRIC_RANGES, DeviceType, Reading

NOMINAL_VOLTAGE_V: Final = 230.0
NOMINAL_FREQUENCY_HZ: Final = 50.0
EXCURSION_PROBABILITY: Final = 1 / 2000
EXCURSION_SECONDS: Final = (30.0, 300.0)
# Control commands
COMMAND_FAILURE_RATE: Final = 0.03  # share of valid commands a device refuses
REBOOT_SECONDS: Final = (5.0, 10.0)  # a rebooting device reports nothing for this long
REBOOTING: Final = "device is rebooting"

Metrics = dict[str, float | None]


PHYSICAL_RANGES: Final[dict[str, tuple[float, float]]] = METRIC_RANGES


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
