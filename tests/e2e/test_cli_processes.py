"""The supervisor and the simulator, run as a user runs them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg

from runtime.settings import PROJECT_ROOT, Settings
from tests.conftest import Components, wait_for

SIMULATION = ["--devices", "16", "--rate", "2", "--duration", "3"]


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_supervisor_restarts_a_crashed_component_and_stops_cleanly(
    stack: Settings, tmp_path: Path
) -> None:
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        sup = subprocess.Popen(
            [sys.executable, "-m", "microgrid.cli", "run", "--only", "projector"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=PROJECT_ROOT,
            env=os.environ.copy(),
        )
    try:
        first = wait_for(lambda: _children(sup.pid), 20, "projector child")[0]
        os.kill(first, signal.SIGKILL)
        second = wait_for(
            lambda: [p for p in _children(sup.pid) if p != first], 20, "restarted projector"
        )[0]
        assert second != first
        text = log.read_text()
        assert re.search(r"projector exited with code -9; restarting", text), text
        time.sleep(2)  # let it join its group before asking it to leave
        sup.send_signal(signal.SIGINT)
        assert sup.wait(timeout=30) == 0
        assert "all components stopped" in log.read_text()
        assert not _children(sup.pid)
    finally:
        if sup.poll() is None:
            sup.kill()


def test_simulate_sends_realistic_readings_that_are_stored(
    platform: Components, db: psycopg.Connection, stack: Settings
) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "microgrid.cli", "simulate", *SIMULATION],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        env={**os.environ, "GATEWAY_PORT": str(stack.gateway_port)},
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    summary = re.search(r"attempted (\d+), accepted (\d+), failed (\d+)", out.stdout)
    assert summary, out.stdout
    attempted, accepted, failed = map(int, summary.groups())
    assert failed == 0 and accepted == attempted and accepted >= 16 * 2 * 2

    def stored() -> int:
        row = db.execute(
            "SELECT count(*) FROM telemetry_readings WHERE device_id ~ '^site-[0-9]{3}-'"
        ).fetchone()
        return int(row[0]) if row else 0

    wait_for(lambda: stored() == accepted, 30, "simulated readings in PostgreSQL")
    kinds = db.execute(
        "SELECT DISTINCT device_type FROM devices WHERE device_id ~ '^site-[0-9]{3}-' ORDER BY 1"
    ).fetchall()
    assert [k[0] for k in kinds] == ["battery", "genset", "load", "meter", "pv_inverter"]
