"""Several members per consumer group on one broker."""

from __future__ import annotations

from functools import partial

import psycopg
from aiokafka.partitioner import murmur2

from tests.conftest import Components, free_port, wait_for
from tests.e2e.test_control import answer, command, fetch_next, register, settled


def partition_of(device: str, partitions: int) -> int:
    """Where the producers put a device's records (Kafka's default partitioner)."""
    return (murmur2(device.encode()) & 0x7FFFFFFF) % partitions


def owns(platform: Components, alias: str) -> bool:
    log = platform.log_dir / f"{alias}.log"
    return "restored state" in log.read_text(errors="replace")


def test_commands_complete_with_controllers_that_do_not_divide_the_partitions(
    platform: Components,
    tokens: dict[str, str],
    db: psycopg.Connection,
    site: str,
    device_key: str,
) -> None:
    """Three controllers share four partitions of commands and of replies: with round-robin
    assignment a member would get the replies of commands another member holds, and those
    commands would fail as never answered. Co-partitioned, each completes."""
    n = platform.s.device_topic_partitions
    extra = ["controller-2", "controller-3"]
    for alias in extra:
        platform.start("controller", alias, CONTROLLER_METRICS_PORT=str(free_port()))
    try:
        for alias in extra:  # the group rebalanced: each new member owns partitions now
            wait_for(partial(owns, platform, alias), 60, f"{alias} to own partitions")
        devices: dict[int, list[str]] = {}
        while len(devices) < n or min(len(d) for d in devices.values()) < 2:
            device = register(platform, db, device_key, site)
            devices.setdefault(partition_of(device, n), []).append(device)
        ids = []
        for group in devices.values():
            for device in group[:2]:
                cid = command(platform, tokens["operator"], device)
                assert fetch_next(platform, device_key, device).json()["id"] == cid
                assert answer(platform, device_key, cid, "succeeded").status_code == 202
                ids.append(cid)
        outcomes = [settled(platform, tokens["viewer"], cid, 30) for cid in ids]
        assert [(o["status"], o.get("reason")) for o in outcomes] == [("succeeded", None)] * len(
            ids
        ), outcomes
    finally:
        for alias in extra:
            platform.stop(alias)
