"""deploy/compose.yaml, checked by structure (no Docker here, and no Compose-specification
schema among the project's dependencies): every component runs as production, only the gateway
and the API publish a port, and every secret comes from the environment with `${VAR:?...}`, so
Compose refuses to start without it."""

from __future__ import annotations

import re
from typing import Any

import yaml

from microgrid.components import COMPONENTS
from runtime.settings import DEV_TOKEN_SECRET, PROJECT_ROOT, Settings

COMPOSE = PROJECT_ROOT / "deploy" / "compose.yaml"
SECRETS = (
    "POSTGRES_PASSWORD",
    "REDIS_PASSWORD",
    "AUTH_TOKEN_SECRET",
    "KAFKA_ADMIN_PASSWORD",
    *(f"KAFKA_{name.upper()}_PASSWORD" for name in COMPONENTS),
)


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def test_every_component_and_service_runs() -> None:
    services = compose()["services"]
    assert set(COMPONENTS) <= set(services)
    assert {"redpanda", "redpanda-users", "kafka-setup", "postgres", "redis", "migrate"} <= set(
        services
    )
    for name in COMPONENTS:
        assert services[name]["command"] == ["run", "--only", name]


def test_only_the_gateway_and_the_api_publish_ports() -> None:
    published = {
        name: svc["ports"] for name, svc in compose()["services"].items() if "ports" in svc
    }
    assert published == {"gateway": ["8000:8000"], "api": ["8080:8080"]}


def test_components_run_as_production_without_demo_passwords() -> None:
    services = compose()["services"]
    demo = {
        str(Settings.model_fields[f"auth_{r}_password"].default)
        for r in ("admin", "operator", "viewer")
    }
    for name in COMPONENTS:
        env = services[name]["environment"]
        assert env["ENVIRONMENT"] == "production"
        assert env["AUTH_TOKEN_SECRET"].startswith("${AUTH_TOKEN_SECRET:?")
        for role in ("ADMIN", "OPERATOR", "VIEWER"):
            assert env[f"AUTH_{role}_PASSWORD"] not in demo


def test_every_secret_is_required_from_the_environment() -> None:
    text = COMPOSE.read_text()
    for secret in SECRETS:
        uses = re.findall(r"\$\{" + secret + r"([^}]*)\}", text)
        assert uses, f"{secret} is not used"
        assert all(use.startswith(":?") for use in uses), f"{secret} has a default: {uses}"
    # no literal credentials: the repository's token secret and the old fixed password
    assert DEV_TOKEN_SECRET not in text
    assert "microgrid:microgrid@" not in text
    services = compose()["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"].startswith(
        "${POSTGRES_PASSWORD:?"
    )
    for name in [*COMPONENTS, "migrate"]:
        assert "${POSTGRES_PASSWORD:?" in services[name]["environment"]["DATABASE_URL"]
    for name in COMPONENTS:
        assert "${REDIS_PASSWORD:?" in services[name]["environment"]["REDIS_URL"]


def test_each_component_connects_to_the_broker_as_itself_and_only_the_setup_as_admin() -> None:
    services = compose()["services"]
    redpanda = " ".join(services["redpanda"]["command"])
    assert "redpanda.enable_sasl=true" in redpanda
    for name in COMPONENTS:
        env = services[name]["environment"]
        assert env["KAFKA_USERNAME"] == "" and env["KAFKA_PASSWORD"] == ""  # no admin
        own = f"KAFKA_{name.upper()}_PASSWORD"
        assert env[own].startswith("${" + own + ":?")
        others = {k for k in env if k.startswith("KAFKA_") and k.endswith("_PASSWORD")}
        assert others == {"KAFKA_PASSWORD", own}, others
        assert services[name]["depends_on"]["kafka-setup"] == {
            "condition": "service_completed_successfully"
        }
    setup = services["kafka-setup"]
    assert setup["command"] == ["kafka", "setup", "--no-credentials"]
    assert setup["environment"]["KAFKA_PASSWORD"].startswith("${KAFKA_ADMIN_PASSWORD:?")
