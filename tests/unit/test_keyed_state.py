"""The stateful shell's per-key state, without any service."""

from __future__ import annotations

import msgspec
import pytest

from stream_processors.keyed_state import KeyedState


class Counter(msgspec.Struct):
    n: int


def test_a_state_for_a_new_key_needs_its_partition() -> None:
    state: KeyedState[Counter] = KeyedState()
    with pytest.raises(KeyError):
        state.set("new", Counter(1))
    state.set("new", Counter(1), 3)
    state.set("new", Counter(2))
    assert (state.get("new"), state.partition_of("new")) == (Counter(2), 3)


class Box(msgspec.Struct):
    items: list[int]

    def copy(self) -> Box:
        return Box(list(self.items))


def test_a_step_changes_a_copy_which_becomes_the_state_only_once_merged() -> None:
    state: KeyedState[Box] = KeyedState(Box.copy)
    state._load("k", Box([1]), 0)
    work = state.get("k")
    assert work is not None
    work.items.append(2)  # as the alerter's evaluation does, in place
    state.set("k", work)
    assert state.get("k") is work  # the rest of the batch sees what it staged
    assert dict(state.items()) == {"k": Box([1])}  # memory is as committed
    state._discard()  # the batch failed: redelivered, it starts from the committed state
    assert state.get("k") == Box([1])
    work = state.get("k")
    assert work is not None
    work.items.append(3)
    state.set("k", work)
    state._merge()
    assert dict(state.items()) == {"k": Box([1, 3])}


def test_a_staged_delete_removes_the_key_only_once_merged() -> None:
    state: KeyedState[Box] = KeyedState(Box.copy)
    state._load("k", Box([1]), 2)
    state.delete("k")
    assert state.get("k") is None and state.peek("k") is None
    assert len(state) == 1 and state.partition_of("k") == 2  # the tombstone's partition
    state._merge()
    assert len(state) == 0
    with pytest.raises(KeyError):
        state.delete("k")  # unknown now: no partition for a tombstone
