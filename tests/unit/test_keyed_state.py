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
