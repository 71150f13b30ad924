"""The platform's wire contract: message types, topic names, header names, group ids."""

from contracts.readings import (
    DEVICE_TYPES,
    METRICS,
    DeviceType,
    Reading,
    ReadingBatch,
    TimeWindow,
    check_time_window,
)
from contracts.topics import Groups, Headers, Topics

__all__ = [
    "DEVICE_TYPES",
    "METRICS",
    "DeviceType",
    "Groups",
    "Headers",
    "Reading",
    "ReadingBatch",
    "TimeWindow",
    "Topics",
    "check_time_window",
]
