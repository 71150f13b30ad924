"""The benchmark harness on a tiny profile: its report adds up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.settings import PROJECT_ROOT
from tests.conftest import Components


@pytest.mark.parametrize("transport", ["http", "kafka"])
def test_tiny_stress_run_reports_consistent_figures(
    platform: Components, tmp_path: Path, transport: str
) -> None:
    report = tmp_path / "bench.json"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "microgrid.cli",
            "bench",
            "--profile",
            "stress",
            "--duration",
            "3",
            "--report",
            str(report),
            "--transport",
            transport,
        ],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        env=os.environ.copy(),
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(report.read_text())
    assert data["profile"] == "stress" and data["mode"] == "batch"
    assert data["attempted_messages"] > 0
    assert data["accepted_messages"] + sum(data["errors"].values()) == data["attempted_messages"]
    assert data["persisted_messages"] == data["accepted_messages"]
    assert data["slo"]["passed"] is True
    for key in ("latency_ms", "e2e_ms"):
        assert 0 < data[key]["p50"] <= data[key]["p95"] <= data[key]["p99"]
    assert data["limit"]["kafka_roundtrip_per_min"] > data["throughput_per_min"] > 0
    assert 0 < data["limit"]["ratio"] < 1
    assert data["alerts_planted_and_seen"] >= 1
    assert data["alerts_planted"] >= data["alerts_planted_and_seen"]
    # where the CPU went: the platform's processes on this host, by role
    cpu = data["cpu_pct_by_process"]
    assert cpu["load generator"] > 0 and cpu["kafka"] > 0
    if transport == "http":
        assert cpu["gateway"] > 0
    assert cpu["validator"] > 0 and cpu["projector"] > 0
    assert report.with_suffix(".png").stat().st_size > 1000
    assert "SLO passed" in out.stderr


def test_failed_slo_exits_non_zero(platform: Components, tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "microgrid.cli",
            "bench",
            "--profile",
            "baseline",
            "--duration",
            "2",
            "--report",
            str(tmp_path / "b.json"),
            "--max-p95-latency-ms",
            "1",
            "--no-measure-limit",
        ],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
        env=os.environ.copy(),
        timeout=240,
    )
    assert out.returncode == 1
    assert "SLO FAILED" in out.stderr
    assert json.loads((tmp_path / "b.json").read_text())["slo"]["passed"] is False
