"""The platform's wire contract: message types, topic names, header names, group ids."""

from contracts.readings import (
    DEVICE_TYPES,
    METRIC_RANGES,
    METRICS,
    DeviceType,
    Reading,
    ReadingBatch,
    TimeWindow,
    check_time_window,
)
from contracts.topics import Events, Groups, Headers, Streams, Topics

__all__ = [
    "DEVICE_TYPES",
    "METRICS",
    "METRIC_RANGES",
    "DeviceType",
    "Events",
    "Groups",
    "Headers",
    "Reading",
    "ReadingBatch",
    "Streams",
    "TimeWindow",
    "Topics",
    "check_time_window",
]
