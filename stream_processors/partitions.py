"""What the FastStream processors share: how they subscribe (batches of raw records, redelivered
when the handler fails), and a rebalance listener that starts restoring partition-scoped
state on assignment and drops it on revocation."""

from __future__ import annotations

from typing import Any, Protocol

from aiokafka import ConsumerRebalanceListener, TopicPartition
from faststream import AckPolicy
from faststream.message import StreamMessage


async def raw_records(msg: StreamMessage[Any]) -> Any:
    return None  # handlers read msg.raw_message; skip FastStream's per-record JSON decode


# A batch whose handler raises is nacked: FastStream (>= 0.7.8) rewinds each of its partitions
# to the batch's first record there, so the batch is redelivered and nothing is committed past.
REDELIVERED_BATCHES: dict[str, Any] = {
    "batch": True,
    "ack_policy": AckPolicy.NACK_ON_ERROR,
    "decoder": raw_records,
}


class PartitionScoped(Protocol):
    def assign(self, partitions: list[int]) -> None: ...

    async def forget(self, partitions: list[int]) -> None: ...


class StateListener(ConsumerRebalanceListener):
    def __init__(self, owner: PartitionScoped) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self.owner.forget(sorted({tp.partition for tp in revoked}))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        if assigned:  # restored in the background: the rebalance does not wait for it
            self.owner.assign(sorted({tp.partition for tp in assigned}))
