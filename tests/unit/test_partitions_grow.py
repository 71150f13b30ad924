"""`microgrid kafka grow`, its pure parts: where keys go, which state moves, who has read
everything, what is refused, and that the command knows every topic and reader there is."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime

import msgspec
import pytest
from aiokafka import TopicPartition
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.protocol.admin import DescribeGroupsRequest_v2

from contracts import Groups, Topics
from microgrid.partitions import (
    CHANGELOGS,
    PLACES,
    READERS,
    Behind,
    GrowError,
    Move,
    Report,
    Survey,
    _DescribeGroups,
    nothing_to_do,
    partition_for,
    place_alerter_state,
    place_controller_state,
    plan_lines,
    plan_moves,
    refusals,
    resume_at,
    summary_lines,
)
from projections.alerts import AlertsProjection
from projections.control import ControlProjection
from projections.telemetry import TelemetryProjection
from runtime.kafka import device_topic_specs, partition_mismatch, topic_specs
from runtime.kafka_access import ACCESS
from runtime.settings import Settings
from stream_processors.alerting import DeviceState
from stream_processors.lifecycle import CommandState

NS = "ns."


def settings(partitions: int = 4) -> Settings:
    return Settings(kafka_namespace=NS, device_topic_partitions=partitions)


def test_keys_go_where_the_producers_put_them() -> None:
    rng = random.Random(7)
    for n in (1, 4, 6, 12, 24, 37):
        partitions = list(range(n))
        for _ in range(200):
            key = uuid.UUID(int=rng.getrandbits(128)).hex[: rng.randint(1, 32)].encode()
            assert partition_for(key, n) == DefaultPartitioner()(key, partitions, partitions)


def alert_state(device: str, last_offset: int) -> bytes:
    return msgspec.json.encode(DeviceState(device, "site-1", "battery", last_offset=last_offset))


def command_state(command: str, device: str) -> bytes:
    return msgspec.json.encode(
        CommandState(
            id=command,
            device_id=device,
            command="charge",
            params={},
            deadline=datetime(2030, 1, 1, tzinfo=UTC),
            status="processing",
        )
    )


def device_moving(n_before: int, n_after: int, moves: bool) -> str:
    while True:
        device = f"dev-{uuid.uuid4().hex[:10]}"
        moved = partition_for(device.encode(), n_before) != partition_for(device.encode(), n_after)
        if moved == moves:
            return device


def test_a_moved_device_state_forgets_the_offset_of_its_old_partition() -> None:
    device = "dev-1"
    target, value = place_alerter_state(device.encode(), alert_state(device, 41), 6)
    assert target == partition_for(b"dev-1", 6)
    assert msgspec.json.decode(value, type=DeviceState).last_offset == -1


def test_a_command_state_goes_to_its_devices_partition_not_its_ids() -> None:
    device = "dev-2"
    value = command_state("cmd-1", device)
    assert place_controller_state(b"cmd-1", value, 6) == (partition_for(device.encode(), 6), value)


def test_only_the_states_whose_key_maps_elsewhere_move() -> None:
    stays = device_moving(4, 6, moves=False)
    moves = device_moving(4, 6, moves=True)
    table = {(partition_for(d.encode(), 4), d.encode()): alert_state(d, 9) for d in (stays, moves)}
    [move] = plan_moves(table, place_alerter_state, 6, Topics.ALERTER_STATE)
    assert (move.key, move.source, move.target) == (
        moves.encode(),
        partition_for(moves.encode(), 4),
        partition_for(moves.encode(), 6),
    )
    assert move.value is not None
    assert msgspec.json.decode(move.value, type=DeviceState).last_offset == -1


def test_a_state_copied_already_by_a_run_that_stopped_only_needs_its_tombstone() -> None:
    device = device_moving(4, 6, moves=True)
    old, new = partition_for(device.encode(), 4), partition_for(device.encode(), 6)
    table = {
        (old, device.encode()): alert_state(device, 9),
        (new, device.encode()): alert_state(device, -1),
    }
    assert plan_moves(table, place_alerter_state, 6, Topics.ALERTER_STATE) == [
        Move(device.encode(), old, new, None)
    ]


def test_a_state_that_does_not_decode_stops_the_plan_before_any_change() -> None:
    with pytest.raises(GrowError, match="does not decode"):
        plan_moves({(0, b"c-1"): b"{}"}, place_controller_state, 6, Topics.CONTROLLER_STATE)


def test_where_a_reader_goes_on() -> None:
    assert resume_at(None, 3, 10, "earliest") == 3
    assert resume_at(None, 3, 10, "latest") == 10
    assert resume_at(-1, 3, 10, "earliest") == 3  # a projection that projected nothing yet
    assert resume_at(7, 3, 10, "latest") == 7
    assert resume_at(1, 3, 10, "earliest") == 3  # expired before it was read
    assert resume_at(12, 3, 10, "earliest") == 10


def survey(**changes: object) -> Survey:
    s = settings()
    sv = Survey(
        counts={spec.name: 4 for spec in device_topic_specs(s)},
        active={},
        behind=[],
        open_transactions=[],
        committed={},
        positions={},
        ends={},
        live={s.topic(t): 0 for t in CHANGELOGS},
        moves={s.topic(t): [] for t in CHANGELOGS},
    )
    for name, value in changes.items():
        setattr(sv, name, value)
    return sv


def test_a_safe_grow_has_no_refusal_and_says_what_it_will_do() -> None:
    s = settings()
    valid = s.topic(Topics.TELEMETRY_VALID)
    sv = survey(committed={(s.group(Groups.ALERTER), valid): {0: 5, 1: 3, 3: 9}})
    assert refusals(s, sv, 6) == []
    assert not nothing_to_do(s, sv, 6)
    lines = plan_lines(s, sv, 6)
    assert lines[0].startswith("raise 12 topics from 4 to 6 partitions: alerter.state, alerts")
    assert "microgrid.alerter: commit the end of telemetry.valid partitions 2" in lines
    assert "microgrid.alerter: start telemetry.valid partitions 4, 5 at offset 0" in lines


def test_refused_when_fewer_partitions_members_active_records_left_or_a_transaction_open() -> None:
    s = settings()
    raw = s.topic(Topics.TELEMETRY_RAW)
    sv = survey(
        active={s.group(Groups.ALERTER): ["microgrid-alerter@127.0.0.1"]},
        open_transactions=[TopicPartition(s.topic(Topics.ALERTS), 2)],
        behind=[Behind(s.group(Groups.VALIDATOR), raw, 1, 40, 42)],
    )
    reasons = refusals(s, sv, 3)
    assert reasons[0].startswith("--partitions 3 is fewer than the topics have (12 topics have 4)")
    assert reasons[1].startswith(
        "consumer group microgrid.alerter has 1 active member(s) (microgrid-alerter@127.0.0.1):"
        " stop the platform first"
    )
    assert reasons[2].startswith("alerts partition 2 has a transaction still open")
    assert reasons[3].startswith(
        "microgrid.validator has not consumed everything of telemetry.raw partition 1 (at"
        " offset 40, the log ends at 42)"
    )


def test_nothing_to_do_once_topics_state_and_offsets_are_at_the_new_count() -> None:
    s = settings()
    counts = {spec.name: 6 for spec in device_topic_specs(s)}
    valid = s.topic(Topics.TELEMETRY_VALID)
    group = s.group(Groups.ALERTER)
    done = survey(counts=counts, committed={(group, valid): {p: 0 for p in range(6)}})
    assert nothing_to_do(s, done, 6)
    half = survey(counts=counts, committed={(group, valid): {p: 0 for p in range(4)}})
    assert not nothing_to_do(s, half, 6)  # a run that stopped before committing offset 0
    assert refusals(s, half, 6) == []


def test_the_summary_says_what_to_set_next() -> None:
    report = Report(6, {"telemetry.raw": 4}, raised=["telemetry.raw"], done=True)
    report.state = {Topics.ALERTER_STATE: {"live": 3, "moved": 2, "tombstoned": 2}}
    lines = summary_lines(report, [])
    assert lines[0].startswith("raised 1 topics from 4 to 6 partitions")
    assert "alerter.state: state of 2 of 3 devices moved" in lines[1]
    assert lines[-1].startswith("next: set DEVICE_TOPIC_PARTITIONS=6")
    assert Report(6, {}).to_dict()["setting"] == "DEVICE_TOPIC_PARTITIONS=6"
    idle = Report(6, {}, pending=False)
    assert summary_lines(idle, []) == [
        "dry run: nothing to do; the topics keyed by device have 6 partitions"
    ]
    assert summary_lines(Report(6, {}, done=True, pending=False), [])[0] == (
        "the topics keyed by device have 6 partitions already"
    )


def test_the_device_topics_are_every_topic_with_device_topic_partitions() -> None:
    s = settings(partitions=7)  # a count no other topic has
    assert device_topic_specs(s) == [spec for spec in topic_specs(s) if spec.partitions == 7]


def test_every_reader_of_a_device_topic_is_known() -> None:
    """The command checks and moves the offsets of READERS: every consumer group's topics
    keyed by device (the ACLs say which a component reads), the changelogs aside (read
    without a group), and the simulator's own groups aside."""
    # names without a namespace (the suite's session sets KAFKA_NAMESPACE), as ACCESS has them
    device_topics = {spec.name for spec in device_topic_specs(Settings(kafka_namespace=""))}
    read = {
        topic
        for name, access in ACCESS.items()
        if access.groups
        for topic in access.read
        if topic in device_topics and topic not in CHANGELOGS
    }
    assert read == {t for r in READERS for t in r.topics}
    assert {r.group for r in READERS} == {g for a in ACCESS.values() for g in a.groups}
    assert set(PLACES) == set(CHANGELOGS)
    names = {r.projection for r in READERS if r.projection}
    assert names == {p.name for p in (TelemetryProjection, AlertsProjection, ControlProjection)}


def test_the_setting_and_the_topics_must_agree() -> None:
    s = settings(partitions=4)
    assert partition_mismatch(s, {"ns.telemetry.raw": 4, "ns.alerter.state": 4}) is None
    one = partition_mismatch(s, {"ns.telemetry.raw": 6, "ns.alerter.state": 6})
    assert one is not None and "set DEVICE_TOPIC_PARTITIONS=6" in one
    mixed = partition_mismatch(s, {"ns.telemetry.raw": 6, "ns.alerter.state": 4})
    assert mixed is not None
    assert "4 partitions: alerter.state; 6 partitions: telemetry.raw" in mixed
    assert "did not finish" in mixed


def test_consumer_groups_are_described_at_a_version_whose_answer_parses() -> None:
    request = _DescribeGroups(["g"])
    assert isinstance(request.prepare({15: (0, 6)}), DescribeGroupsRequest_v2)
