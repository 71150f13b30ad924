"""The committed OpenAPI/AsyncAPI documents cannot drift from the code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from runtime.settings import PROJECT_ROOT

PACKAGES = (
    "contracts",
    "ingest_gateway",
    "stream_processors",
    "projections",
    "query_api",
    "microgrid",
    "ui",
)


def _copy_project(dest: Path) -> Path:
    for name in PACKAGES:
        shutil.copytree(
            PROJECT_ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__")
        )
    return dest


def _check(root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [sys.executable, "-m", "microgrid.cli", "contracts", "check"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_committed_contracts_match_the_code() -> None:
    out = _check(PROJECT_ROOT)
    assert out.returncode == 0, out.stderr
    assert "up to date" in out.stdout


def test_changing_a_route_without_regenerating_fails_the_check(tmp_path: Path) -> None:
    root = _copy_project(tmp_path)
    assert _check(root).returncode == 0
    app = root / "ingest_gateway" / "app.py"
    app.write_text(app.read_text().replace('"/api/v1/telemetry/batch"', '"/api/v1/readings/batch"'))
    out = _check(root)
    assert out.returncode == 1
    assert "openapi/ingest-gateway.json is out of date" in out.stderr
    assert "/api/v1/readings/batch" in out.stderr


def test_changing_a_message_field_fails_the_check(tmp_path: Path) -> None:
    root = _copy_project(tmp_path)
    readings = root / "contracts" / "readings.py"
    text = readings.read_text()
    assert "    soc_pct: StateOfCharge | None = None\n" in text
    readings.write_text(text.replace("    soc_pct: StateOfCharge | None = None\n", ""))
    out = _check(root)
    assert out.returncode == 1
    assert "asyncapi/validator.json is out of date" in out.stderr
