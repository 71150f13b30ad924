"""Several members per consumer group: the controller's two inputs stay co-partitioned, and
`microgrid run --replicas` gives each member its own metrics port."""

from __future__ import annotations

import pytest
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata

from microgrid.supervisor import members

TOPICS = ("control.commands", "control.results")


class Cluster:
    def __init__(self, partitions: int) -> None:
        self.partitions = set(range(partitions))

    def partitions_for_topic(self, topic: str) -> set[int]:
        return self.partitions


def split(
    assignor: type[AbstractPartitionAssignor], members_n: int, partitions: int = 12
) -> list[dict[str, list[int]]]:
    """Each member's partitions of each topic, as the group leader assigns them."""
    subscriptions = {
        f"controller-{i:02d}": ConsumerProtocolMemberMetadata(0, list(TOPICS), b"")
        for i in range(members_n)
    }
    assigned = assignor.assign(Cluster(partitions), subscriptions)
    return [{topic: sorted(ps) for topic, ps in assigned[m].assignment} for m in sorted(assigned)]


@pytest.mark.parametrize("members_n", range(1, 13))
def test_the_controllers_assignment_gives_each_member_the_same_partitions_of_both(
    members_n: int,
) -> None:
    shares = split(RangePartitionAssignor, members_n)
    for share in shares:
        assert share.get(TOPICS[0], []) == share.get(TOPICS[1], []), share
    owned = sorted(p for share in shares for p in share.get(TOPICS[0], []))
    assert owned == list(range(12))  # every partition has one owner


@pytest.mark.parametrize("members_n", [5, 7, 8])
def test_round_robin_would_split_commands_from_their_replies(members_n: int) -> None:
    shares = split(RoundRobinPartitionAssignor, members_n)
    assert any(share.get(TOPICS[0], []) != share.get(TOPICS[1], []) for share in shares)


def test_replicas_are_members_with_ports_of_their_own() -> None:
    ports = {"VALIDATOR_METRICS_PORT": 9101, "PROJECTOR_METRICS_PORT": 9102}
    children = members(["gateway", "validator", "projector"], {"validator": 3}, ports, {})
    assert [(c.name, c.label) for c in children] == [
        ("gateway", "gateway"),
        ("validator", "validator-1"),
        ("validator", "validator-2"),
        ("validator", "validator-3"),
        ("projector", "projector"),
    ]
    assert [c.env.get("VALIDATOR_METRICS_PORT") for c in children[1:4]] == [None, "9201", "9301"]
