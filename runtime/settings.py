"""One settings object for every component, read from the environment (and `.env`)."""

from __future__ import annotations

import ssl
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEV_TOKEN_SECRET = "dev-only-token-secret-do-not-use-in-production"
# Development credentials of the local broker's principals (in the repository: dev only).
SERVICE_PRINCIPALS = (
    "gateway", "validator", "alerter", "controller", "projector", "api", "simulator",
)  # fmt: skip
DEV_KAFKA_PASSWORDS = {
    name: f"{name}-kafka-dev-password" for name in ("admin", *SERVICE_PRINCIPALS)
}


def cluster_env_file(stack_dir: Path) -> Path:
    """The settings the clients of the local Kafka cluster need (its brokers, the replication
    factor), written by `microgrid stack up --brokers 3` and removed by a `stack up` of one
    broker."""
    return stack_dir / "kafka-cluster" / "clients.env"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """The environment first, then the local cluster's client settings (while the stack
        runs `stack up --brokers 3`), then `.env`."""
        given = [
            source().get("stack_dir") for source in (init_settings, env_settings, dotenv_settings)
        ]
        stack_dir = Path(next((d for d in given if d), cls.model_fields["stack_dir"].default))
        stack_dir = stack_dir if stack_dir.is_absolute() else PROJECT_ROOT / stack_dir
        cluster = DotEnvSettingsSource(settings_cls, env_file=cluster_env_file(stack_dir))
        return init_settings, env_settings, cluster, dotenv_settings, file_secret_settings

    # No default: the platform's processes refuse to start without it (require_environment).
    environment: str = Field("", description="dev | test | production (anything else: production)")
    log_level: str = "INFO"

    # Services
    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    database_url: str = "postgresql://microgrid:microgrid@127.0.0.1:5432/microgrid"
    redis_url: str = "redis://127.0.0.1:6379/0"

    # Kafka authentication (SASL/SCRAM-SHA-512). KAFKA_USERNAME/KAFKA_PASSWORD name the
    # principal of tools (CLI, benchmark, tests) and, on the local stack, the broker's admin
    # (a super user). Each platform component connects as its own principal,
    # `microgrid-<component>`, with the password KAFKA_<COMPONENT>_PASSWORD and only the
    # topics and groups it needs (ACLs).
    kafka_username: str = "admin"
    kafka_principal_prefix: str = "microgrid-"  # components' principals: <prefix><component>
    kafka_password: str = DEV_KAFKA_PASSWORDS["admin"]
    kafka_gateway_password: str = DEV_KAFKA_PASSWORDS["gateway"]
    kafka_validator_password: str = DEV_KAFKA_PASSWORDS["validator"]
    kafka_alerter_password: str = DEV_KAFKA_PASSWORDS["alerter"]
    kafka_controller_password: str = DEV_KAFKA_PASSWORDS["controller"]
    kafka_projector_password: str = DEV_KAFKA_PASSWORDS["projector"]
    kafka_api_password: str = DEV_KAFKA_PASSWORDS["api"]
    kafka_simulator_password: str = DEV_KAFKA_PASSWORDS["simulator"]
    # TLS to the broker (SASL_SSL): for brokers off this host. The local stack serves it on
    # KAFKA_TLS_PORT with a certificate of its own (.stack/kafka/tls/ca.pem).
    kafka_tls: bool = False
    kafka_tls_cafile: str = Field("", description="PEM CA file for the broker; empty: system's")

    # Kafka layout
    kafka_namespace: str = Field("", description="prefix for topic names and group ids")
    device_topic_partitions: int = Field(12, ge=1)
    topic_replication_factor: int = Field(1, ge=1)
    telemetry_retention_hours: int = Field(168, ge=1)
    dlq_retention_hours: int = Field(720, ge=1)
    # Partitions of each topic of a site with topics of its own (`keys create --kafka`).
    site_topic_partitions: int = Field(3, ge=1)
    # How soon the validator subscribes to a site's topics made after it started (it follows
    # them by pattern; each new one costs a rebalance of its group).
    validator_topic_refresh_s: float = Field(5.0, ge=0.5)

    # Ingest gateway
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8000
    # Two processes answer requests on both cores: at 100,000 single requests/min one
    # process was the busiest on the machine (73 % of a core) and its queue set the p95.
    gateway_workers: int = Field(2, ge=1)
    ingest_max_batch: int = Field(1000, ge=1)
    ingest_max_body_bytes: int = Field(1_048_576, ge=1024)
    # How long a request waits for the broker's acknowledgement once its records are handed
    # to the producer (aiokafka's idempotent producer never expires them itself).
    ingest_ack_timeout_ms: int = Field(10_000, ge=50)
    # Admission, per worker: past either bound a request is refused (503) before production.
    ingest_max_inflight_readings: int = Field(20_000, ge=1)
    ingest_max_inflight_bytes: int = Field(8 * 1_048_576, ge=1_048_576)
    # Optional readings-per-second limits (0: none), shared by all workers through Redis.
    ingest_key_readings_per_s: int = Field(0, ge=0)
    ingest_site_readings_per_s: int = Field(0, ge=0)
    # A verified key is trusted this long without asking PostgreSQL again: a revoked key is
    # refused within this time, and while PostgreSQL is unreachable no longer than this.
    ingest_key_cache_s: float = Field(30.0, ge=0)
    # How a device comes to belong to a site: "first-reading" registers an unknown device to
    # the site of the first reading that names it (under a key of that site); "admin" accepts
    # readings only for devices an admin registered (`microgrid devices add`).
    device_registration: Literal["first-reading", "admin"] = "first-reading"
    # How long a request may take to send its body once its key is accepted (else 408).
    ingest_body_timeout_s: float = Field(5.0, gt=0)
    producer_linger_ms: int = Field(5, ge=0)
    producer_compression: Literal["none", "gzip", "snappy", "lz4", "zstd"] = "lz4"
    producer_max_batch_bytes: int = Field(1_048_576, ge=16_384)

    # Query API (and dashboard)
    api_host: str = "127.0.0.1"
    api_port: int = 8080
    public_origin: str = "http://127.0.0.1:8080"

    # Query API authentication
    auth_token_secret: str = Field(DEV_TOKEN_SECRET, description="HS256 key for access tokens")
    auth_token_ttl_s: int = Field(3600, ge=60)
    auth_admin_username: str = "admin"
    auth_admin_password: str = "admin-dev-password"
    auth_operator_username: str = "operator"
    auth_operator_password: str = "operator-dev-password"
    auth_viewer_username: str = "viewer"
    auth_viewer_password: str = "viewer-dev-password"
    login_max_failures: int = Field(5, ge=1, description="failed logins before a lockout")
    login_lockout_s: int = Field(300, ge=1)
    # argon2 verifications at once per API process (each takes 64 MiB); a login that finds
    # none free within 5 s is refused with 503 and Retry-After
    login_max_verifications: int = Field(4, ge=1)
    device_offline_after_s: int = Field(120, ge=1)
    device_latest_interval_s: float = Field(2.0, ge=0, description="per-device SSE throttle")
    event_retention_s: int = Field(
        900,
        ge=600,
        description="live alert, notification and command events kept for resuming, in seconds",
    )
    latest_stream_maxlen: int = Field(
        10_000, ge=100, description="device.latest events kept in their (lossy) stream"
    )
    event_backlog_max: int = Field(
        10_000, ge=100, description="live events held per kind while Redis is away"
    )
    # Readings export (GET /api/v1/readings/export): the longest `to - from` one request may
    # ask for, in hours (default: the telemetry log's retention), and exports streaming at once
    # per API process (each holds a pooled connection while it streams; past them: 503).
    export_max_range_h: int = Field(168, ge=1)
    export_max_concurrent: int = Field(2, ge=1)
    # An export's time in all, in seconds: past it, it stops and its body is cut short, so a
    # client that stops reading holds a slot, a connection and an open transaction (which holds
    # back vacuum) this long at most. CSV streamed at about 50,000 rows/s here (Parquet 87,000):
    # 600 s is some 30 million rows, a week of 50 devices at 1 reading/s; split longer ones.
    export_timeout_s: float = Field(600.0, gt=0)

    # Prometheus endpoints of the consumer processes (HTTP apps serve /metrics themselves)
    metrics_host: str = "127.0.0.1"
    validator_metrics_port: int = 9101
    projector_metrics_port: int = 9102
    alerter_metrics_port: int = 9103
    controller_metrics_port: int = 9104

    # Validation window for reading timestamps
    max_future_skew_s: int = Field(300, ge=0)
    max_reading_age_s: int = Field(7 * 24 * 3600, ge=60)

    # Stream processors and projections
    # Stream consumers let the broker gather data before answering a fetch: fewer, larger
    # batches cut the per-batch cost (fetch, handler, commit, produce request) at a bounded
    # delay per stage.
    consumer_fetch_min_bytes: int = Field(65_536, ge=1)
    consumer_fetch_max_wait_ms: int = Field(100, ge=0)
    validator_max_records: int = Field(500, ge=1)
    projector_max_records: int = Field(2000, ge=1)
    alerter_max_records: int = Field(1000, ge=1)
    # How long the controller keeps a finished command (after its deadline, too): a request
    # whose deadline is older than this is refused as stale (control.dlq), never run.
    controller_terminal_retention_s: float = Field(3600.0, gt=0)

    # Telemetry in PostgreSQL: raw readings and their 1-minute rollups are dropped by whole day
    # partitions once past their retention, hourly rollups by the hour. Raw retention must
    # outlast MAX_READING_AGE_S by a day (a late reading finds its partition), and 1h >= 1m >=
    # raw. The telemetry projection checks every TELEMETRY_EXPIRY_INTERVAL_S.
    telemetry_raw_retention_days: int = Field(30, ge=1)
    rollup_1m_retention_days: int = Field(90, ge=1)
    rollup_1h_retention_days: int = Field(730, ge=1)
    telemetry_expiry_interval_s: float = Field(3600.0, ge=1)

    # Simulator run by `make dev`
    sim_devices: int = Field(48, ge=1)
    sim_rate: float = Field(1.0, gt=0, description="readings per second per device")

    # Local stack (`microgrid stack`)
    stack_dir: Path = PROJECT_ROOT / ".stack"
    kafka_controller_port: int = 9093
    kafka_tls_port: int = 9094  # the local broker's SASL_SSL listener
    kafka_heap: str = "1g"

    @property
    def is_dev(self) -> bool:
        return self.environment in ("dev", "test")

    @property
    def environment_problem(self) -> str | None:
        """Why a platform process must not start in this environment, or None."""
        if not self.environment.strip():
            return (
                "ENVIRONMENT is not set: set it to dev, test or production"
                " (make dev sets dev, make test sets test)"
            )
        return None

    @field_validator("stack_dir")
    @classmethod
    def _anchor_stack_dir(cls, value: Path) -> Path:
        return value if value.is_absolute() else PROJECT_ROOT / value

    @model_validator(mode="after")
    def _retentions_nest(self) -> Settings:
        raw_s = self.telemetry_raw_retention_days * 86_400
        if raw_s < self.max_reading_age_s + 86_400:
            raise ValueError(
                "TELEMETRY_RAW_RETENTION_DAYS must exceed MAX_READING_AGE_S by at least a day"
                f" ({self.telemetry_raw_retention_days} days against {self.max_reading_age_s} s)"
            )
        if not (
            self.rollup_1h_retention_days
            >= self.rollup_1m_retention_days
            >= self.telemetry_raw_retention_days
        ):
            raise ValueError(
                "need ROLLUP_1H_RETENTION_DAYS >= ROLLUP_1M_RETENTION_DAYS >="
                " TELEMETRY_RAW_RETENTION_DAYS"
            )
        return self

    def topic(self, name: str) -> str:
        return f"{self.kafka_namespace}{name}"

    def group(self, name: str) -> str:
        return f"{self.kafka_namespace}{name}"

    @property
    def kafka_client(self) -> dict[str, Any]:
        """Connection and authentication arguments of every aiokafka client."""
        tls = {"ssl_context": self.kafka_ssl_context()} if self.kafka_tls else {}
        return {
            "bootstrap_servers": self.kafka_bootstrap_servers,
            "security_protocol": "SASL_SSL" if self.kafka_tls else "SASL_PLAINTEXT",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_plain_username": self.kafka_username,
            "sasl_plain_password": self.kafka_password,
            **tls,
        }

    def kafka_ssl_context(self) -> ssl.SSLContext:
        """Verifies the broker's certificate and host name against KAFKA_TLS_CAFILE (or the
        system's CAs)."""
        return ssl.create_default_context(cafile=self.kafka_tls_cafile or None)

    def service_credentials(self, component: str) -> tuple[str, str]:
        """The Kafka principal and password a platform component connects with."""
        password = str(getattr(self, f"kafka_{component}_password"))
        return f"{self.kafka_principal_prefix}{component}", password

    def as_service(self, component: str) -> Settings:
        """These settings, connecting to Kafka as `component`'s principal."""
        username, password = self.service_credentials(component)
        return self.model_copy(update={"kafka_username": username, "kafka_password": password})

    @property
    def kafka_port(self) -> int:
        return int(self.kafka_bootstrap_servers.split(",")[0].rsplit(":", 1)[1])


class MissingEnvironment(RuntimeError):
    """A platform process was started without ENVIRONMENT."""


def require_environment(s: Settings) -> None:
    if reason := s.environment_problem:
        raise MissingEnvironment(reason)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
