"""Where the CPU goes during a run: CPU time of the platform's local processes, by role."""

from __future__ import annotations

import os

import psutil


def _role(proc: psutil.Process) -> str | None:
    if proc.pid == os.getpid():
        return "load generator"
    try:
        name = proc.name()
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    if "microgrid.components" in cmdline:
        return cmdline[-1]  # gateway, validator, alerter, ... (a component's workers add up)
    if name == "java" and any("kafka" in arg for arg in cmdline):
        return "kafka"
    if name.startswith("postgres"):
        return "postgresql"
    if name.startswith("redis-server"):
        return "redis"
    return None


def _times() -> dict[int, tuple[str, float]]:
    roles: dict[int, tuple[str, psutil.Process]] = {}
    for proc in psutil.process_iter():
        role = _role(proc)
        if role is not None:
            roles[proc.pid] = (role, proc)
    for role, proc in list(roles.values()):
        if role == "load generator":
            continue
        try:  # e.g. the gateway's worker processes, when it runs several
            children = proc.children(recursive=True)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        for child in children:
            roles.setdefault(child.pid, (role, child))
    out = {}
    for pid, (role, proc) in roles.items():
        try:
            t = proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        out[pid] = (role, t.user + t.system)
    return out


class CpuMeter:
    """CPU time of Kafka, PostgreSQL, Redis, each component and the load generator between
    `start()` and `stop()`, as a percentage of one core. Processes on other hosts are not seen."""

    def __init__(self) -> None:
        self.before: dict[int, tuple[str, float]] = {}

    def start(self) -> None:
        self.before = _times()

    def stop(self, elapsed_s: float) -> dict[str, float]:
        used: dict[str, float] = {}
        for pid, (role, seconds) in _times().items():
            start = self.before.get(pid, (role, 0.0))[1]  # new processes count from zero
            used[role] = used.get(role, 0.0) + max(0.0, seconds - start)
        if elapsed_s <= 0:
            return {}
        pct = {role: round(100 * s / elapsed_s, 1) for role, s in used.items()}
        return dict(sorted(pct.items(), key=lambda kv: -kv[1]))
