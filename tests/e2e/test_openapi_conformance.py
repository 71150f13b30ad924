"""The OpenAPI documents tell the whole truth: Schemathesis, every check, against the running
gateway (with a device key) and query API (with a token of each role), one run per phase.

The suite runs a bounded number of examples (CONTRACT_EXAMPLES, 5): the coverage phase of each
app, and the fuzzing and stateful phases for each role. `make test-contracts` runs every phase
for every role at depth (CONTRACT_DEPTH=deep, 100 examples). The refusals a schema cannot
carry are configured per operation in tests/contracts/*.toml and listed in the README.

What the fuzzer makes is undone or kept to this test's site, so later tests of the session
find the platform as they would without it: the alert rules it made are deleted (each would
raise alerts on every later test's devices), its failed logins forgotten, and the operations
that act on whatever a filter matches (`BULK`: a bulk acknowledgement acks every matching
alert of the caller's sites) are fuzzed only by an operator of this test's site, never with a
token of every site (a viewer's are refused, 403, and run with the rest).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from runtime.keys import create_key
from runtime.settings import PROJECT_ROOT
from tests.conftest import Components
from tests.e2e.test_control import command, register
from tests.e2e.test_tenancy_api import login, make_user

CONFIGS = PROJECT_ROOT / "tests" / "contracts"
DEEP = os.environ.get("CONTRACT_DEPTH") == "deep"
EXAMPLES = int(os.environ.get("CONTRACT_EXAMPLES", "100" if DEEP else "5"))
# the documents carry no examples, so the examples phase would generate nothing
ALL_PHASES = ("coverage", "fuzzing", "stateful")
CONTRACT_SITE = "site-contracts"
# operations that change everything a filter matches within the caller's sites
BULK = ("ackAlerts",)


def runs() -> list[tuple[str, str, str]]:
    """(app, role, phase): the coverage phase does not depend on the number of examples and
    costs the most (about 2,000 cases for the query API), so the suite runs it once per app."""
    found = [("gateway", "device", phase) for phase in ("coverage", "fuzzing")]  # no links
    for role in ("admin", "operator", "viewer"):
        phases = ALL_PHASES if DEEP or role == "admin" else ("fuzzing", "stateful")
        found += [("query-api", role, phase) for phase in phases]
    # BULK alone, by an operator of CONTRACT_SITE (no links to follow)
    found += [("query-api", "site-operator", phase) for phase in ("coverage", "fuzzing")]
    return found


def operations(role: str) -> list[str]:
    """Which operations a role's run covers (Schemathesis' filter options)."""
    if role == "site-operator":
        return [arg for op in BULK for arg in ("--include-operation-id", op)]
    if role in ("admin", "operator"):  # tokens of every site
        return [arg for op in BULK for arg in ("--exclude-operation-id", op)]
    return []


def schemathesis(
    config: Path,
    url: str,
    credential: str,
    phase: str,
    env: dict[str, str],
    only: list[str] | None = None,
) -> str:
    st = Path(sys.executable).parent / "st"
    argv = [str(st), "--no-color", "--config-file", str(config), "run", f"{url}/docs/openapi.json"]
    argv += ["--header", f"Authorization: Bearer {credential}", "--phases", phase]
    argv += ["--max-examples", str(EXAMPLES), "--checks", "all", *(only or [])]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=900, env={**os.environ, **env}, check=False
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-12_000:]
    return out


def forget_failed_logins(platform: Components) -> None:
    """The fuzzer's failed logins lock 127.0.0.1 out, as they should (429): the suite's later
    logins come from the same address."""
    client = redis.Redis.from_url(platform.s.redis_url)
    try:
        for key in client.scan_iter(match=f"{platform.s.topic('')}login-failures:*"):
            client.delete(key)
    finally:
        client.close()


def rule_ids(platform: Components, token: str) -> set[str]:
    r = httpx.get(
        f"{platform.api_url}/api/v1/alert-rules",
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    return {rule["id"] for rule in r.json()["items"]}


def delete_rules(platform: Components, token: str, ids: set[str]) -> None:
    """The rules the fuzzer made: each would raise alerts on every device of the later tests."""
    for rule_id in ids:
        r = httpx.delete(
            f"{platform.api_url}/api/v1/alert-rules/{rule_id}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        assert r.status_code in (204, 404), r.text


@pytest.fixture(scope="module")
def site_operator(platform: Components) -> str:
    """A token of an operator of CONTRACT_SITE only."""
    with psycopg.connect(platform.s.database_url, autocommit=True) as db:
        username = make_user(db, "operator", [CONTRACT_SITE])
    with httpx.Client(base_url=platform.api_url, timeout=10) as client:
        return login(client, username)


@pytest.fixture(scope="module")
def gateway_target(platform: Components, tokens: dict[str, str]) -> dict[str, str]:
    """A device key, a device of its site and a command waiting for that device."""
    site = CONTRACT_SITE
    with psycopg.connect(platform.s.database_url, autocommit=True) as db:
        key = create_key(db, site)
        device = register(platform, db, key, site)
    cid = command(platform, tokens["operator"], device, ttl_s=3600)
    return {"key": key, "CONTRACT_DEVICE_ID": device, "CONTRACT_COMMAND_ID": cid}


@pytest.mark.parametrize(("app", "role", "phase"), runs(), ids=lambda v: str(v))
def test_schemathesis_finds_no_failure(
    platform: Components,
    tokens: dict[str, str],
    gateway_target: dict[str, str],
    site_operator: str,
    app: str,
    role: str,
    phase: str,
) -> None:
    if app == "gateway":
        env = {k: v for k, v in gateway_target.items() if k.startswith("CONTRACT_")}
        url, credential = platform.gateway_url, gateway_target["key"]
    else:
        env, url = {}, platform.api_url
        credential = site_operator if role == "site-operator" else tokens[role]
    rules = rule_ids(platform, tokens["admin"])
    try:
        out = schemathesis(CONFIGS / f"{app}.toml", url, credential, phase, env, operations(role))
    finally:
        if app == "query-api":
            forget_failed_logins(platform)
            delete_rules(platform, tokens["admin"], rule_ids(platform, tokens["admin"]) - rules)
    generated = re.search(r"(\d+) generated", out)
    cases = int(generated.group(1)) if generated else 0
    # printed for `make test-contracts` (pytest -s): the case counts of the closing note
    print(f"\nschemathesis {app} {role} {phase}: {cases} cases, no failure")
    if phase in ("coverage", "fuzzing"):
        assert cases > 0, out[-4000:]  # a phase that generated nothing has proven nothing
