"""`microgrid run`: each component in its own process, restarted when it crashes.

Ctrl-C (or SIGTERM) stops them all cleanly: each gets SIGTERM, flushes its producer or leaves
its consumer group, and is killed only if it has not exited within the grace period.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

log = logging.getLogger("microgrid.supervisor")

GRACE_S = 15.0
MAX_BACKOFF_S = 30.0
HEALTHY_AFTER_S = 60.0


# The components that are consumer groups, and the setting of each one's metrics port: their
# members share the group's partitions (`microgrid run --replicas`).
GROUP_METRICS_PORTS: dict[str, str] = {
    "validator": "VALIDATOR_METRICS_PORT",
    "alerter": "ALERTER_METRICS_PORT",
    "controller": "CONTROLLER_METRICS_PORT",
    "projector": "PROJECTOR_METRICS_PORT",
}
REPLICA_PORT_STEP = 100  # member i serves its metrics on the group's port + 100 * i


@dataclass
class Child:
    name: str
    label: str = ""  # name-i for a member of several
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    next_start: float = 0.0
    env: dict[str, str] = field(default_factory=dict)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "microgrid.components", self.name],
            env={**os.environ, **self.env},
        )
        self.started_at = time.monotonic()
        log.info("started %s (pid %d)", self.label or self.name, self.proc.pid)


def members(
    names: list[str], replicas: dict[str, int], ports: dict[str, int], env: dict[str, str]
) -> list[Child]:
    """One child per component, or `replicas[name]` of a consumer group's: member i serves its
    metrics on the group's port (`ports`, by setting) + REPLICA_PORT_STEP * i."""
    children = []
    for name in names:
        n = replicas.get(name, 1)
        for i in range(n):
            extra = {}
            if i:
                setting = GROUP_METRICS_PORTS[name]
                extra[setting] = str(ports[setting] + REPLICA_PORT_STEP * i)
            label = f"{name}-{i + 1}" if n > 1 else name
            children.append(Child(name, label, env={**env, **extra}))
    return children


class Supervisor:
    def __init__(
        self,
        names: list[str],
        env: dict[str, str] | None = None,
        replicas: dict[str, int] | None = None,
        ports: dict[str, int] | None = None,
    ) -> None:
        self.children = members(names, replicas or {}, ports or {}, env or {})
        self.stopping = False

    def _request_stop(self, signum: int, _frame: object) -> None:
        if not self.stopping:
            log.info("received %s, stopping components", signal.Signals(signum).name)
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._request_stop)
        signal.signal(signal.SIGTERM, self._request_stop)
        for child in self.children:
            child.start()
        while not self.stopping:
            time.sleep(0.25)
            now = time.monotonic()
            for child in self.children:
                self._watch(child, now)
        self._stop_all()
        return 0

    def _watch(self, child: Child, now: float) -> None:
        if child.proc is None:
            if now >= child.next_start:
                child.start()
            return
        code = child.proc.poll()
        if code is None or self.stopping:
            if child.restarts and now - child.started_at > HEALTHY_AFTER_S:
                child.restarts = 0
            return
        backoff = min(MAX_BACKOFF_S, 2.0**child.restarts)
        child.restarts += 1
        log.error(
            "%s exited with code %s; restarting in %.0fs (restart #%d)",
            child.label or child.name,
            code,
            backoff,
            child.restarts,
        )
        child.proc = None
        child.next_start = now + backoff

    def _stop_all(self) -> None:
        running = [c.proc for c in self.children if c.proc and c.proc.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_S
        for proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("pid %d did not stop within %.0fs; killing it", proc.pid, GRACE_S)
                proc.kill()
                proc.wait()
        log.info("all components stopped")
