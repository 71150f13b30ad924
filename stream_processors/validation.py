"""Pure core of the validator: one `telemetry.raw` record in, a verdict out. No I/O."""

from __future__ import annotations

from datetime import datetime

import msgspec

from contracts import Reading, ReadingBatch, TimeWindow, check_time_window

_reading = msgspec.json.Decoder(Reading)
_batch = msgspec.json.Decoder(ReadingBatch)
_encode = msgspec.json.Encoder().encode


class Valid(msgspec.Struct, frozen=True):
    device_id: str
    site_id: str
    value: bytes  # a normalized ReadingBatch, JSON
    count: int


class Invalid(msgspec.Struct, frozen=True):
    reason: str


def decode_readings(value: bytes) -> list[Reading]:
    """Decode a record holding one reading or a batch; raises msgspec errors."""
    if b'"readings"' in value:
        try:
            return _batch.decode(value).readings
        except msgspec.ValidationError:
            try:
                return [_reading.decode(value)]
            except msgspec.MsgspecError:
                pass
            raise
    return [_reading.decode(value)]


def validate_record(
    key: bytes | None, value: bytes | None, now: datetime, window: TimeWindow
) -> Valid | Invalid:
    if not value:
        return Invalid("empty record value")
    try:
        readings = decode_readings(value)
    except msgspec.ValidationError as exc:  # a subclass of DecodeError: catch it first
        return Invalid(f"invalid reading: {exc}")
    except msgspec.DecodeError as exc:
        return Invalid(f"malformed JSON: {exc}")
    device_id = readings[0].device_id
    if any(r.device_id != device_id for r in readings):
        return Invalid("readings of several devices in one record: send one record per device")
    site_id = readings[0].site_id
    if any(r.site_id != site_id for r in readings):
        return Invalid(f"readings of device {device_id!r} for several sites in one record")
    if key is None:  # unkeyed records would scatter a device's readings over partitions
        return Invalid(f"record without a key: key each record by its device id ({device_id!r})")
    if key != device_id.encode():
        return Invalid(f"record key {key[:80]!r} is not the readings' device id {device_id!r}")
    for i, r in enumerate(readings):
        reason = check_time_window(r, now, window)
        if reason:
            return Invalid(f"readings[{i}]: {reason}")
    return Valid(device_id, site_id, _encode(ReadingBatch(readings=readings)), len(readings))
