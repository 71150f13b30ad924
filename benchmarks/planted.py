"""Alert latency: out-of-range readings planted during a run, timed to their SSE event."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from datetime import UTC, datetime

import httpx

from runtime.settings import Settings

THRESHOLD_C = 150.0


class AlertProbe:
    """Creates a rule for one planted device, plants readings above it, and listens on SSE."""

    def __init__(self, s: Settings, key: str, site: str, run: str) -> None:
        self.s, self.key, self.site = s, key, site
        self.device = f"bench-{run}-planted"
        self.api = f"http://{s.api_host}:{s.api_port}"
        self.gateway = f"http://{s.gateway_host}:{s.gateway_port}"
        self.client = httpx.AsyncClient(timeout=10)
        self.token = ""
        self.rule_id: str | None = None
        self.planted: list[float] = []  # monotonic time of each planted reading's 202
        self.seen: list[float] = []  # monotonic time of each alert.opened for the device
        self.listener: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AlertProbe:
        r = await self.client.post(
            f"{self.api}/api/v1/auth/login",
            json={"username": self.s.auth_admin_username, "password": self.s.auth_admin_password},
        )
        r.raise_for_status()
        self.token = r.json()["access_token"]
        rule = {
            "name": f"bench planted {self.device}",
            "kind": "threshold",
            "metric": "temperature_c",
            "op": "gt",
            "threshold": THRESHOLD_C,
            "severity": "warning",
            "scope": {"device_id": self.device},
        }
        r = await self.client.post(f"{self.api}/api/v1/alert-rules", json=rule, headers=self._auth)
        r.raise_for_status()
        self.rule_id = r.json()["id"]
        connected = asyncio.Event()
        self.listener = asyncio.create_task(self._listen(connected))
        await asyncio.wait_for(connected.wait(), 10)
        await asyncio.sleep(0.5)  # the rule reaches the alerters through its topic
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.listener:
            self.listener.cancel()
        if self.rule_id:
            with contextlib.suppress(httpx.HTTPError):
                await self.client.delete(
                    f"{self.api}/api/v1/alert-rules/{self.rule_id}", headers=self._auth
                )
        await self.client.aclose()

    @property
    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def _listen(self, connected: asyncio.Event) -> None:
        url = f"{self.api}/api/v1/stream"
        async with (
            httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client,
            client.stream("GET", url, headers=self._auth) as resp,
        ):
            connected.set()
            event, data = "", ""
            async for line in resp.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data = line[5:].strip()
                elif not line and event == "alert.opened":
                    if json.loads(data).get("device_id") == self.device:
                        self.seen.append(time.monotonic())
                    event, data = "", ""

    async def _reading(self, temperature: float) -> float:
        body = {
            "device_id": self.device,
            "site_id": self.site,
            "device_type": "meter",
            "ts": datetime.now(UTC).isoformat(),
            "temperature_c": temperature,
        }
        r = await self.client.post(
            f"{self.gateway}/api/v1/telemetry",
            json=body,
            headers={"Authorization": f"Bearer {self.key}"},
        )
        return time.monotonic() if r.status_code == 202 else -1.0

    async def plant_every(self, interval: float, duration: float) -> None:
        """An out-of-range reading, then a normal one to clear it, every `interval` seconds."""
        start = time.monotonic()
        while time.monotonic() - start < duration:
            accepted = await self._reading(THRESHOLD_C + 30)
            if accepted > 0:
                self.planted.append(accepted)
            await asyncio.sleep(min(1.0, interval / 2))
            await self._reading(20.0)
            await asyncio.sleep(max(0.0, interval - min(1.0, interval / 2)))

    async def latencies_ms(self, wait_s: float = 5.0) -> list[float]:
        deadline = time.monotonic() + wait_s
        while len(self.seen) < len(self.planted) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        out = []
        for t in self.planted:
            after = [s for s in self.seen if s >= t - 0.5]
            if after:
                out.append(max(0.0, (min(after) - t) * 1000))
        return out
