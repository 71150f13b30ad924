"""The local stack: Kafka (KRaft, from Maven Central jars), PostgreSQL and Redis, run natively.

State lives under `settings.stack_dir`; `down` stops only processes whose pid files are there.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from runtime.settings import Settings


def new_cluster_id() -> str:
    """A KRaft cluster id: a random UUID in URL-safe base64, as Kafka's own `Uuid.randomUuid`
    makes it, and like it never starting with '-': `StorageTool format -t -...` takes such an
    id for an option and fails (one fresh stack in 64 failed so)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


class StackError(RuntimeError):
    """A prerequisite is missing or a service would not start; the message says what to do."""


@dataclass
class ServiceStatus:
    name: str
    port: int
    running: bool
    pid: int | None
    detail: str


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:  # a child of ours that died is a zombie until reaped: reap it, it is gone
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(path: Path) -> int | None:
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if _pid_alive(pid) else None


def _status(name: str, port: int, pidfile: Path) -> ServiceStatus:
    pid = _read_pid(pidfile)
    up = port_open(port)
    detail = "started by this stack" if pid else ("external" if up else "stopped")
    return ServiceStatus(name, port, up, pid, detail)


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    tail = ""
    if log.exists():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
    raise StackError(f"{what} did not become ready within {timeout:.0f}s; see {log}\n{tail}")


def _stop_pid(pid: int, timeout: float = 30.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.2)
    if _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)


class Kafka:
    name = "kafka"

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.home = settings.stack_dir / "kafka"
        self.libs = self.home / "libs"
        self.data = self.home / "data"
        self.pidfile = self.home / "kafka.pid"
        self.log = self.home / "kafka.log"
        self.port = settings.kafka_port

    def _check_prerequisites(self) -> None:
        if shutil.which("java") is None:
            raise StackError(
                "java not found: install a Java 17 runtime (apt-get install default-jre)"
            )
        if not glob.glob(str(self.libs / "kafka_2.13-*.jar")):
            raise StackError(f"Kafka jars not found in {self.libs}: run `make setup` first")

    def _write_config(self) -> Path:
        cfg = self.home / "server.properties"
        ctl, tls = self.s.kafka_controller_port, self.s.kafka_tls_port
        keystore, store_password = self._certificate()
        jaas = (
            "org.apache.kafka.common.security.scram.ScramLoginModule required"
            f' username="{self.s.kafka_username}" password="{self.s.kafka_password}";'
        )
        cfg.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.voters=1@127.0.0.1:{ctl}",
                    # clients: SASL/SCRAM only; the KRaft controller listener stays on
                    # loopback without SASL (SCRAM cannot serve it), its peers ANONYMOUS
                    # (and the same with TLS on KAFKA_TLS_PORT)
                    f"listeners=SASL_PLAINTEXT://127.0.0.1:{self.port},"
                    f"SASL_SSL://127.0.0.1:{tls},CONTROLLER://127.0.0.1:{ctl}",
                    f"advertised.listeners=SASL_PLAINTEXT://127.0.0.1:{self.port},"
                    f"SASL_SSL://127.0.0.1:{tls}",
                    "controller.listener.names=CONTROLLER",
                    "listener.security.protocol.map="
                    "CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,SASL_SSL:SASL_SSL",
                    "inter.broker.listener.name=SASL_PLAINTEXT",
                    "sasl.enabled.mechanisms=SCRAM-SHA-512",
                    "sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512",
                    "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=" + jaas,
                    "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=" + jaas,
                    f"listener.name.sasl_ssl.ssl.keystore.location={keystore}",
                    f"listener.name.sasl_ssl.ssl.keystore.password={store_password}",
                    f"listener.name.sasl_ssl.ssl.key.password={store_password}",
                    "listener.name.sasl_ssl.ssl.keystore.type=PKCS12",
                    "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                    "allow.everyone.if.no.acl.found=false",
                    f"super.users=User:{self.s.kafka_username};User:ANONYMOUS",
                    f"log.dirs={self.data}",
                    f"num.partitions={self.s.device_topic_partitions}",
                    "auto.create.topics.enable=false",
                    "offsets.topic.replication.factor=1",
                    "offsets.topic.num.partitions=12",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    "log.retention.hours=168",
                    "message.max.bytes=4194304",
                    "",
                ]
            )
        )
        log4j = self.home / "log4j2.properties"
        log4j.write_text(
            "\n".join(
                [
                    "status = error",
                    "appender.console.type = Console",
                    "appender.console.name = STDOUT",
                    "appender.console.layout.type = PatternLayout",
                    "appender.console.layout.pattern = [%d] %p %m (%c)%n",
                    "rootLogger.level = WARN",
                    "rootLogger.appenderRef.stdout.ref = STDOUT",
                    "logger.kafka.name = kafka.server.KafkaRaftServer",
                    "logger.kafka.level = INFO",
                    "",
                ]
            )
        )
        return cfg

    @property
    def ca_file(self) -> Path:
        """The local broker's certificate, which TLS clients trust (KAFKA_TLS_CAFILE)."""
        return self.home / "tls" / "ca.pem"

    def _certificate(self) -> tuple[Path, str]:
        """The TLS listener's key and self-signed certificate for 127.0.0.1 (a PKCS12 keystore,
        and the certificate as PEM for clients), made once with the JDK's keytool; returns the
        keystore and its password."""
        tls = self.home / "tls"
        keystore, secret = tls / "broker.p12", tls / "keystore.password"
        if keystore.exists() and secret.exists() and self.ca_file.exists():
            return keystore, secret.read_text().strip()
        keytool = shutil.which("keytool")
        if keytool is None:
            raise StackError(
                "keytool not found: install a Java 17 JDK (apt-get install default-jdk)"
            )
        tls.mkdir(parents=True, exist_ok=True)
        keystore.unlink(missing_ok=True)
        password = secrets.token_urlsafe(24)
        store = ["-keystore", str(keystore), "-storetype", "PKCS12", "-storepass", password]
        subprocess.run(
            [
                keytool,
                "-genkeypair",
                "-alias",
                "broker",
                "-keyalg",
                "EC",
                "-groupname",
                "secp256r1",
                "-sigalg",
                "SHA256withECDSA",
                "-dname",
                "CN=127.0.0.1",
                "-ext",
                "SAN=ip:127.0.0.1,dns:localhost",
                "-ext",
                "BC:c=ca:true",
                "-validity",
                "3650",
                *store,
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                keytool,
                "-exportcert",
                "-rfc",
                "-alias",
                "broker",
                "-file",
                str(self.ca_file),
                *store,
            ],
            check=True,
            capture_output=True,
        )
        secret.write_text(password)
        return keystore, password

    def _java(self, *args: str) -> list[str]:
        return [
            "java",
            f"-Xms{self.s.kafka_heap}",
            f"-Xmx{self.s.kafka_heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            "-cp",
            f"{self.libs}/*",
            *args,
        ]

    def status(self) -> ServiceStatus:
        return _status(self.name, self.port, self.pidfile)

    def up(self) -> None:
        if self.s.kafka_tls:
            raise StackError(
                "`stack up` takes the local broker's SASL_PLAINTEXT port from"
                " KAFKA_BOOTSTRAP_SERVERS: run it without KAFKA_TLS. Its TLS listener is"
                f" 127.0.0.1:{self.s.kafka_tls_port} (KAFKA_TLS_PORT), whose certificate"
                f" clients trust with KAFKA_TLS_CAFILE={self.ca_file}"
            )
        if _read_pid(self.pidfile) and port_open(self.port):
            if port_open(self.s.kafka_tls_port):
                return
            print("restarting the local broker to add its TLS listener")
            self.down()
        if port_open(self.port):  # something already serves Kafka on this port: use it if
            self._check_credentials()  # it takes our credentials
            return
        self._check_prerequisites()
        if self.data.exists() and not self.sasl_marker.exists():
            # formatted before brokers authenticated: its admin has no SCRAM credentials, and
            # nothing without them may connect any more
            print(f"reformatting the local broker with SASL/SCRAM: removing {self.data}")
            shutil.rmtree(self.data)
        self.data.mkdir(parents=True, exist_ok=True)
        cfg = self._write_config()
        if not (self.data / "meta.properties").exists():
            cluster_id = new_cluster_id()
            admin = f"SCRAM-SHA-512=[name={self.s.kafka_username},password={self.s.kafka_password}]"
            subprocess.run(
                self._java(
                    "kafka.tools.StorageTool",
                    "format",
                    "-t",
                    cluster_id,
                    "-c",
                    str(cfg),
                    "--add-scram",
                    admin,
                ),
                check=True,
                capture_output=True,
            )
            self.sasl_marker.touch()
        with self.log.open("ab") as out:
            proc = subprocess.Popen(
                self._java("kafka.Kafka", str(cfg)),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pidfile.write_text(str(proc.pid))
        _wait_for(lambda: port_open(self.port), 60, "Kafka", self.log)

    def down(self) -> None:
        pid = _read_pid(self.pidfile)
        if pid:
            _stop_pid(pid)
        self.pidfile.unlink(missing_ok=True)

    @property
    def sasl_marker(self) -> Path:
        return self.home / "sasl-formatted"

    def _check_credentials(self) -> None:
        """A broker this stack did not start is used only if it accepts our credentials."""
        from confluent_kafka import KafkaException

        from runtime.kafka_access import admin_client

        try:
            admin_client(self.s).list_topics(timeout=10)
        except KafkaException as exc:
            raise StackError(
                f"a broker on port {self.port} that this stack did not start does not accept"
                f" the credentials of KAFKA_USERNAME ({self.s.kafka_username!r}): {exc}."
                " Stop it, or set KAFKA_USERNAME and KAFKA_PASSWORD to an admin's"
            ) from exc


def _pg_bindir() -> Path:
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
        reverse=True,
    )
    if candidates:
        return Path(candidates[0]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise StackError(
        "PostgreSQL server binaries not found: install them (apt-get install postgresql)"
    )


def _postgres_home(stack_dir: Path) -> Path:
    """Where PostgreSQL keeps its data: under the stack dir, unless `postgres` cannot reach it."""
    home = stack_dir / "postgres"
    if os.geteuid() != 0:
        return home
    probe = subprocess.run(
        ["runuser", "-u", "postgres", "--", "test", "-x", str(stack_dir.resolve().parent)],
        capture_output=True,
    )
    if probe.returncode == 0:
        return home
    digest = hashlib.sha256(str(stack_dir.resolve()).encode()).hexdigest()[:10]
    return Path("/var/tmp") / f"microgrid-postgres-{digest}"


class Postgres:
    name = "postgres"

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.home = _postgres_home(settings.stack_dir)
        self.data = self.home / "data"
        self.run_dir = self.home / "run"
        self.log = self.home / "postgres.log"
        url = urlsplit(settings.database_url)
        self.port = url.port or 5432
        self.user = url.username or "microgrid"
        self.password = url.password or "microgrid"
        self.dbname = (url.path or "/microgrid").lstrip("/") or "microgrid"

    def _as_owner(self, cmd: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
        # PostgreSQL refuses to run as root: run it as the `postgres` user then.
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=True, capture_output=True, **kw)  # type: ignore[call-overload]

    def _chown(self) -> None:
        if os.geteuid() != 0:
            return
        import pwd

        pw = pwd.getpwnam("postgres")
        for root, dirs, files in os.walk(self.home):
            os.chown(root, pw.pw_uid, pw.pw_gid)
            for f in (*dirs, *files):
                os.chown(os.path.join(root, f), pw.pw_uid, pw.pw_gid)

    def status(self) -> ServiceStatus:
        return _status(self.name, self.port, self.data / "postmaster.pid")

    def up(self) -> None:
        if port_open(self.port):
            if _read_pid(self.data / "postmaster.pid"):
                self._ensure_database()
            return
        bindir = _pg_bindir()
        if os.geteuid() == 0:
            try:
                import pwd

                pwd.getpwnam("postgres")
            except KeyError as exc:
                raise StackError("user `postgres` not found: install postgresql") from exc
        self.home.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log.touch()
        self._chown()
        if not (self.data / "PG_VERSION").exists():
            self._as_owner(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(self.data),
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                    "-U",
                    "postgres",
                ]
            )
        opts = " ".join(
            [
                f"-p {self.port}",
                "-c listen_addresses=127.0.0.1",
                f"-c unix_socket_directories={self.run_dir}",
                "-c shared_buffers=512MB",
                "-c max_wal_size=4GB",
                "-c checkpoint_timeout=15min",
                "-c max_connections=200",
                "-c wal_compression=on",
            ]
        )
        try:
            self._as_owner(
                [
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(self.data),
                    "-l",
                    str(self.log),
                    "-o",
                    opts,
                    "-w",
                    "-t",
                    "60",
                    "start",
                ]
            )
        except subprocess.CalledProcessError as exc:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
            raise StackError(f"PostgreSQL did not start; see {self.log}\n{tail}") from exc
        self._ensure_database()

    def _psql(self, sql: str, db: str = "postgres") -> str:
        out = self._as_owner(
            [
                "psql",
                "-h",
                str(self.run_dir),
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                db,
                "-v",
                "ON_ERROR_STOP=1",
                "-tAc",
                sql,
            ]
        )
        return out.stdout.decode().strip()

    def _ensure_database(self) -> None:
        user, pw, db = self.user, self.password.replace("'", "''"), self.dbname
        if not self._psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{user}'"):
            self._psql(f"CREATE ROLE \"{user}\" LOGIN CREATEDB PASSWORD '{pw}'")
        if not self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{db}'"):
            self._psql(f'CREATE DATABASE "{db}" OWNER "{user}"')

    def down(self) -> None:
        if not _read_pid(self.data / "postmaster.pid"):
            return
        bindir = _pg_bindir()
        self._as_owner([str(bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"])


class Redis:
    name = "redis"

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.home = settings.stack_dir / "redis"
        self.data = self.home
        self.pidfile = self.home / "redis.pid"
        self.log = self.home / "redis.log"
        self.port = urlsplit(settings.redis_url).port or 6379

    def status(self) -> ServiceStatus:
        return _status(self.name, self.port, self.pidfile)

    def up(self) -> None:
        if port_open(self.port):
            return
        exe = shutil.which("redis-server")
        if exe is None:
            raise StackError(
                "redis-server not found: run `make setup` (apt-get install redis-server)"
            )
        self.home.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [
                exe,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.home),
                "--daemonize",
                "yes",
                "--pidfile",
                str(self.pidfile),
                "--logfile",
                str(self.log),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
            ],
            check=True,
            capture_output=True,
        )
        _wait_for(
            lambda: port_open(self.port) and _read_pid(self.pidfile) is not None,
            20,
            "Redis",
            self.log,
        )

    def down(self) -> None:
        pid = _read_pid(self.pidfile)
        if pid:
            _stop_pid(pid)


def services(settings: Settings) -> list[Kafka | Postgres | Redis]:
    return [Postgres(settings), Redis(settings), Kafka(settings)]
