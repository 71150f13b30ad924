"""A reading and a batch of readings, as sent over HTTP and carried on `telemetry.raw`.

Types and physical ranges are checked by msgspec at decode time; the time window depends on
the clock, so it is a separate check (`check_time_window`), shared by gateway and validator.

A metric is an optional number of `Reading` with its physical range: `METRICS` and
`METRIC_RANGES` are read off the type, so adding a metric is a field here (and a migration
that adds its column to `telemetry_readings` and `device_latest`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Final, Literal, get_args

import msgspec
import msgspec.inspect
from msgspec import Meta

DeviceType = Literal["pv_inverter", "battery", "load", "genset", "meter"]
DEVICE_TYPES: Final[tuple[str, ...]] = get_args(DeviceType)

Identifier = Annotated[
    str,
    # (?!\n) because `$` alone also matches before a trailing newline
    Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*(?!\n)$"),
]
# Free text (reasons, names, messages): no control characters (C0, DEL, C1), which terminals,
# logs and PostgreSQL (NUL) do not take.
TEXT_PATTERN: Final = r"^[^\x00-\x1f\x7f-\x9f]*(?!\n)$"
Text = Annotated[str, Meta(pattern=TEXT_PATTERN)]
AwareTime = Annotated[datetime, Meta(tz=True)]
Voltage = Annotated[float, Meta(ge=0, le=50_000)]
Current = Annotated[float, Meta(ge=-20_000, le=20_000)]
Frequency = Annotated[float, Meta(ge=40, le=70)]
Power = Annotated[float, Meta(ge=-100_000, le=100_000)]
StateOfCharge = Annotated[float, Meta(ge=0, le=100)]
Temperature = Annotated[float, Meta(ge=-60, le=200)]


class Reading(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True, gc=False):
    device_id: Identifier
    site_id: Identifier
    device_type: DeviceType
    ts: AwareTime
    seq: Annotated[int, Meta(ge=0, le=2**63 - 1)] | None = None
    voltage_v: Voltage | None = None
    current_a: Current | None = None
    frequency_hz: Frequency | None = None
    power_kw: Power | None = None
    soc_pct: StateOfCharge | None = None
    temperature_c: Temperature | None = None


def _metric_ranges() -> dict[str, tuple[float, float]]:
    """Each optional float field of `Reading`, with the range its type allows."""
    info = msgspec.inspect.type_info(Reading)
    assert isinstance(info, msgspec.inspect.StructType)
    ranges = {}
    for field in info.fields:
        kinds = field.type.types if isinstance(field.type, msgspec.inspect.UnionType) else ()
        number = next((k for k in kinds if isinstance(k, msgspec.inspect.FloatType)), None)
        if number is None or field.required:
            continue
        if number.ge is None or number.le is None:
            raise TypeError(f"metric {field.name} needs a physical range (Meta(ge=..., le=...))")
        ranges[field.name] = (float(number.ge), float(number.le))
    return ranges


METRIC_RANGES: Final[dict[str, tuple[float, float]]] = _metric_ranges()
METRICS: Final[tuple[str, ...]] = tuple(METRIC_RANGES)


class ReadingBatch(msgspec.Struct, forbid_unknown_fields=True):
    readings: Annotated[list[Reading], Meta(min_length=1)]


class TimeWindow(msgspec.Struct, frozen=True):
    """How far a reading's timestamp may lie from the receiver's clock."""

    max_future: timedelta
    max_age: timedelta


def check_time_window(reading: Reading, now: datetime, window: TimeWindow) -> str | None:
    """Return why the reading's timestamp is unacceptable, or None when it is fine."""
    if reading.ts > now + window.max_future:
        return f"ts {reading.ts.isoformat()} is more than {window.max_future} in the future"
    if reading.ts < now - window.max_age:
        return f"ts {reading.ts.isoformat()} is older than {window.max_age}"
    return None
