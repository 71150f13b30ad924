"""The local stack's pure parts."""

from __future__ import annotations

import uuid

import pytest

from microgrid import stack


def test_a_cluster_id_never_starts_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kafka's StorageTool takes `-t -...` for an option: an id starting with '-' (0xf8 as its
    first byte, in URL-safe base64) is drawn again, as Kafka's own Uuid.randomUuid does."""
    drawn = iter([uuid.UUID(bytes=b"\xf8" + bytes(15)), uuid.UUID(bytes=b"\x01" * 16)])
    monkeypatch.setattr(stack.uuid, "uuid4", lambda: next(drawn))
    cluster_id = stack.new_cluster_id()
    assert cluster_id == "AQEBAQEBAQEBAQEBAQEBAQ"
    assert len(cluster_id) == 22
