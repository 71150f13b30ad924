"""A small server-sent-events client for tests: collects events in a background thread."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Event:
    id: str
    event: str
    data: Any
    received: float


@dataclass
class SSEClient:
    url: str
    token: str
    last_event_id: str | None = None
    events: list[Event] = field(default_factory=list)
    status: int | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError("SSE stream did not open")

    def _run(self) -> None:
        try:
            self._read()
        except httpx.HTTPError:
            pass  # the server went away, or the test ended
        finally:
            self._ready.set()

    def _read(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        with (
            httpx.Client(timeout=httpx.Timeout(5, read=None)) as client,
            client.stream("GET", self.url, headers=headers) as resp,
        ):
            self.status = resp.status_code
            self._ready.set()
            current: dict[str, str] = {}
            for line in resp.iter_lines():
                if self._stop.is_set():
                    return
                if not line:
                    if "event" in current:
                        self.events.append(
                            Event(
                                current.get("id", ""),
                                current["event"],
                                json.loads(current.get("data", "null")),
                                time.monotonic(),
                            )
                        )
                    current = {}
                elif not line.startswith(":"):
                    name, _, value = line.partition(":")
                    current[name] = value.removeprefix(" ")

    def of(self, event: str, **match: Any) -> list[Event]:
        return [
            e
            for e in self.events
            if e.event == event and all(e.data.get(k) == v for k, v in match.items())
        ]

    def close(self) -> None:
        self._stop.set()
