"""The local stack: Kafka (KRaft, from Maven Central jars), PostgreSQL and Redis, run natively.

State lives under `settings.stack_dir`; `down` stops only processes whose pid files are there.
Kafka runs as one broker (`kafka/`) or, with `stack up --brokers 3`, as a three-broker cluster
(`kafka-cluster/node-<i>/`, node i on the configured ports + 100 * (i - 1)); never both.
"""

from __future__ import annotations

import base64
import contextlib
import functools
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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from runtime.settings import PROJECT_ROOT, Settings, cluster_env_file

if TYPE_CHECKING:
    from confluent_kafka.admin import AdminClient


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


def kafka_libs(settings: Settings) -> Path:
    """The Kafka jars: the stack dir's (`make setup` puts them there), else the default stack
    dir's, so a stack in another STACK_DIR (a test's, say) needs no copy of its own."""
    own = settings.stack_dir / "kafka" / "libs"
    if glob.glob(str(own / "kafka_2.13-*.jar")):
        return own
    default = PROJECT_ROOT / ".stack" / "kafka" / "libs"
    return default if glob.glob(str(default / "kafka_2.13-*.jar")) else own


class Kafka:
    """The single broker (broker and KRaft controller in one process, node 1)."""

    name = "kafka"
    node_id = 1

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.home = settings.stack_dir / "kafka"  # the jars and the TLS certificate live here
        self.libs = kafka_libs(settings)
        self.dir = self.home  # this broker's config, pid file and log
        self.data = self.home / "data"
        self.pidfile = self.home / "kafka.pid"
        self.log = self.home / "kafka.log"
        self.port = settings.kafka_port
        self.controller_port = settings.kafka_controller_port
        self.tls_port = settings.kafka_tls_port

    def _voters(self) -> str:
        return f"{self.node_id}@127.0.0.1:{self.controller_port}"

    def _replication(self) -> list[str]:
        """The replication settings of internal topics (one broker: one copy)."""
        return [
            "offsets.topic.replication.factor=1",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
        ]

    def _check_prerequisites(self) -> None:
        if shutil.which("java") is None:
            raise StackError(
                "java not found: install a Java 17 runtime (apt-get install default-jre)"
            )
        if not glob.glob(str(self.libs / "kafka_2.13-*.jar")):
            raise StackError(f"Kafka jars not found in {self.libs}: run `make setup` first")

    def _write_config(self) -> Path:
        cfg = self.dir / "server.properties"
        ctl, tls = self.controller_port, self.tls_port
        keystore, store_password = self._certificate()
        jaas = (
            "org.apache.kafka.common.security.scram.ScramLoginModule required"
            f' username="{self.s.kafka_username}" password="{self.s.kafka_password}";'
        )
        cfg.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    f"node.id={self.node_id}",
                    f"controller.quorum.voters={self._voters()}",
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
                    *self._replication(),
                    "offsets.topic.num.partitions=12",
                    "group.initial.rebalance.delay.ms=0",
                    "log.retention.hours=168",
                    "message.max.bytes=4194304",
                    "",
                ]
            )
        )
        log4j = self.dir / "log4j2.properties"
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
            f"-Dlog4j2.configurationFile={self.dir / 'log4j2.properties'}",
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
        cluster = KafkaCluster(self.s)
        if running := cluster.running():
            raise StackError(
                f"the {len(cluster.nodes)}-broker cluster runs"
                f" ({', '.join(f'{n.name} on 127.0.0.1:{n.port}' for n in running)}):"
                " run `microgrid stack down` first, then `microgrid stack up`"
            )
        cluster.env_file.unlink(missing_ok=True)  # clients go back to the one broker
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
            subprocess.run(self._format(cfg, new_cluster_id()), check=True, capture_output=True)
            self.sasl_marker.touch()
        self._launch(cfg)
        _wait_for(lambda: port_open(self.port), 60, "Kafka", self.log)

    def _format(self, cfg: Path, cluster_id: str) -> list[str]:
        """The command that formats this broker's storage, with the admin's SCRAM credentials."""
        admin = f"SCRAM-SHA-512=[name={self.s.kafka_username},password={self.s.kafka_password}]"
        java, *options = self._java(
            "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(cfg),
            "--add-scram", admin,
        )  # fmt: skip
        # a tool that runs a second: without the optimising compiler it starts in half the
        # time (1.2 s against 2.5 s here)
        return [java, "-XX:TieredStopAtLevel=1", *options]

    def _launch(self, cfg: Path) -> None:
        with self.log.open("ab") as out:
            proc = subprocess.Popen(
                self._java("kafka.Kafka", str(cfg)),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pidfile.write_text(str(proc.pid))

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


CLUSTER_SIZE = 3  # `stack up --brokers 3`
PORT_STEP = 100  # node i listens on the configured Kafka ports + PORT_STEP * (i - 1)


def node_ports(settings: Settings, node_id: int) -> tuple[int, int, int]:
    """A cluster node's SASL_PLAINTEXT, CONTROLLER and SASL_SSL ports: node 1 on the configured
    ones (KAFKA_BOOTSTRAP_SERVERS's first port, KAFKA_CONTROLLER_PORT, KAFKA_TLS_PORT), node i
    on those + 100 * (i - 1): 9092/9093/9094, 9192/9193/9194, 9292/9293/9294 by default."""
    step = PORT_STEP * (node_id - 1)
    return (
        settings.kafka_port + step,
        settings.kafka_controller_port + step,
        settings.kafka_tls_port + step,
    )


class KafkaNode(Kafka):
    """One node of the local cluster: broker and one of its KRaft controllers, with a config,
    data, pid file and log of its own under `kafka-cluster/node-<i>/`; the jars and the TLS
    certificate (the same on every node) are the single broker's."""

    def __init__(self, settings: Settings, node_id: int, size: int = CLUSTER_SIZE) -> None:
        super().__init__(settings)
        self.node_id, self.size = node_id, size
        self.name = f"kafka-{node_id}"
        self.dir = settings.stack_dir / "kafka-cluster" / f"node-{node_id}"
        self.data = self.dir / "data"
        self.pidfile = self.dir / "kafka.pid"
        self.log = self.dir / "kafka.log"
        self.port, self.controller_port, self.tls_port = node_ports(settings, node_id)

    @property
    def ports(self) -> tuple[int, int, int]:
        return self.port, self.controller_port, self.tls_port

    def _voters(self) -> str:
        return ",".join(
            f"{i}@127.0.0.1:{node_ports(self.s, i)[1]}" for i in range(1, self.size + 1)
        )

    def _replication(self) -> list[str]:
        """Every record on every node, acknowledged (acks=all) once on two: one node may fail
        without losing an acknowledged record or stopping writes."""
        isr = min(2, self.size)
        return [
            f"default.replication.factor={self.size}",
            f"min.insync.replicas={isr}",
            f"offsets.topic.replication.factor={self.size}",
            f"transaction.state.log.replication.factor={self.size}",
            f"transaction.state.log.min.isr={isr}",
            "unclean.leader.election.enable=false",
        ]

    def up(self) -> None:
        """Start this node again (kill -9 and restart in tests); the cluster's other nodes
        must run for it to come up."""
        KafkaCluster(self.s, self.size).start(self.node_id)

    def down(self) -> None:
        """Stop the whole cluster (what `stack down` asks of each node): nodes stopped one after
        another lose their quorum, and the last then waits for it until killed (30 s)."""
        KafkaCluster(self.s, self.size).down()


class KafkaCluster:
    """The local three-broker KRaft cluster (`microgrid stack up --brokers 3`): each node broker
    and controller, with SASL/SCRAM, ACLs and TLS exactly like the single broker; data apart
    from the single broker's, under `kafka-cluster/`. Clients find it through
    `kafka-cluster/clients.env`, which the settings read (after `.env`; the environment
    overrides it) until a `stack up` of one broker removes it."""

    name = "kafka"

    def __init__(self, settings: Settings, size: int = CLUSTER_SIZE) -> None:
        self.s = settings
        self.home = settings.stack_dir / "kafka-cluster"
        self.data = self.home
        self.nodes = [KafkaNode(settings, i, size) for i in range(1, size + 1)]
        self.env_file = cluster_env_file(settings.stack_dir)

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def client_settings(self) -> Settings:
        """`self.s` for the cluster's clients: every broker to bootstrap from, topics with a
        copy on each."""
        return self.s.model_copy(
            update={
                "kafka_bootstrap_servers": self.bootstrap_servers,
                "topic_replication_factor": len(self.nodes),
            }
        )

    def node(self, node_id: int) -> KafkaNode:
        return self.nodes[node_id - 1]

    def running(self) -> list[KafkaNode]:
        return [node for node in self.nodes if _read_pid(node.pidfile)]

    def in_use(self) -> bool:
        """Whether the stack's Kafka is this cluster: it was the last started, or it runs."""
        return self.env_file.exists() or bool(self.running())

    def status(self) -> ServiceStatus:
        statuses = self.statuses()
        up = sum(st.running for st in statuses)
        detail = f"{up} of {len(statuses)} brokers up"
        return ServiceStatus(self.name, self.nodes[0].port, up == len(statuses), None, detail)

    def statuses(self) -> list[ServiceStatus]:
        return [node.status() for node in self.nodes]

    def up(self) -> None:
        if self.s.kafka_tls:
            raise StackError(
                "`stack up` takes the brokers' SASL_PLAINTEXT ports from KAFKA_BOOTSTRAP_SERVERS:"
                " run it without KAFKA_TLS"
            )
        single = Kafka(self.s)
        if pid := _read_pid(single.pidfile):
            raise StackError(
                f"the single broker of this stack runs (pid {pid}, 127.0.0.1:{single.port}):"
                f" run `microgrid stack down` first, then `microgrid stack up --brokers"
                f" {len(self.nodes)}`"
            )
        self._start([node for node in self.nodes if not _read_pid(node.pidfile)])
        self.env_file.write_text(
            "# Written by `microgrid stack up --brokers N`, removed by `microgrid stack up` (one\n"
            "# broker). The settings read it after .env; the environment overrides it.\n"
            f"KAFKA_BOOTSTRAP_SERVERS={self.bootstrap_servers}\n"
            f"TOPIC_REPLICATION_FACTOR={len(self.nodes)}\n"
            f"# TLS clients: KAFKA_TLS=true KAFKA_TLS_CAFILE={single.ca_file}\n"
            "# KAFKA_BOOTSTRAP_SERVERS="
            + ",".join(f"127.0.0.1:{node.tls_port}" for node in self.nodes)
            + "\n"
        )
        self.wait_for_brokers(60)

    def start(self, node_id: int) -> None:
        """Start one node again (after `kill`), and wait until it serves clients."""
        self._start([self.node(node_id)])

    def _start(self, nodes: list[KafkaNode]) -> None:
        if not nodes:
            return
        busy = [f"127.0.0.1:{port}" for node in nodes for port in node.ports if port_open(port)]
        if busy:
            raise StackError(
                f"{', '.join(busy)} in use by something this stack did not start (each node i"
                " of the cluster listens on the configured Kafka ports + 100 * (i - 1)): stop"
                " it, or give the cluster other ports (KAFKA_BOOTSTRAP_SERVERS,"
                " KAFKA_CONTROLLER_PORT, KAFKA_TLS_PORT)"
            )
        nodes[0]._check_prerequisites()
        self.home.mkdir(parents=True, exist_ok=True)
        cluster_id = self._cluster_id()
        formatting = []
        for node in nodes:
            node.data.mkdir(parents=True, exist_ok=True)
            cfg = node._write_config()
            if not (node.data / "meta.properties").exists():
                proc = subprocess.Popen(
                    node._format(cfg, cluster_id),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
                formatting.append((node, proc))
        for node, proc in formatting:  # in parallel: each is a JVM starting
            out, _ = proc.communicate()
            if proc.returncode:
                tail = "\n".join(out.decode(errors="replace").splitlines()[-15:])
                raise StackError(f"formatting {node.name}'s storage failed:\n{tail}")
        for node in nodes:
            node._launch(node.dir / "server.properties")
        for node in nodes:  # a broker listens once the controllers' quorum answered it
            _wait_for(functools.partial(port_open, node.port), 90, node.name, node.log)

    def _cluster_id(self) -> str:
        """The cluster's id: made once, kept in `cluster.id`, the same on every node."""
        path = self.home / "cluster.id"
        if path.exists():
            return path.read_text().strip()
        for node in self.nodes:  # formatted before the file existed
            meta = node.data / "meta.properties"
            for line in meta.read_text().splitlines() if meta.exists() else []:
                if line.startswith("cluster.id="):
                    path.write_text(line.split("=", 1)[1].strip())
                    return path.read_text().strip()
        path.write_text(new_cluster_id())
        return path.read_text().strip()

    def wait_for_brokers(self, timeout: float) -> None:
        """Until the cluster's metadata names every broker (each registered and unfenced)."""
        from confluent_kafka import KafkaException

        admin = _quiet_admin(self.client_settings())
        seen: set[int] = set()

        def all_registered() -> bool:
            nonlocal seen
            try:
                seen = set(admin.list_topics(timeout=5).brokers)
            except KafkaException:
                return False
            return len(seen) == len(self.nodes)

        deadline = time.monotonic() + timeout
        while not all_registered():
            if time.monotonic() > deadline:
                raise StackError(
                    f"the cluster did not name all {len(self.nodes)} brokers within"
                    f" {timeout:.0f} s (it names {sorted(seen)}); see the logs under {self.home}"
                )
            time.sleep(0.5)

    def kill(self, node_id: int) -> None:
        """SIGKILL one node (a broker crash: no controlled shutdown) and wait until it is gone."""
        node = self.node(node_id)
        pid = _read_pid(node.pidfile)
        if pid is None:
            raise StackError(f"{node.name} is not running")
        os.kill(pid, signal.SIGKILL)
        _wait_for(lambda: not _pid_alive(pid), 30, f"{node.name} to die", node.log)
        node.pidfile.unlink(missing_ok=True)

    def down(self) -> None:
        """Stop every node at once (one after another, the last ones wait for a quorum)."""
        pids = [pid for node in self.nodes if (pid := _read_pid(node.pidfile))]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in pids:
            _stop_pid(pid)
        for node in self.nodes:
            node.pidfile.unlink(missing_ok=True)


def _quiet_admin(settings: Settings) -> AdminClient:
    """An admin client that does not log each refused connection (a stopped broker's, while
    a test waits for the cluster): its calls still fail when no broker answers."""
    from confluent_kafka.admin import AdminClient

    from runtime.kafka_access import librdkafka_config

    return AdminClient({**librdkafka_config(settings), "log_level": 0})


def under_replicated_partitions(settings: Settings, topics: Iterable[str] | None = None) -> int:
    """Partitions (of `topics`, default all, internal ones too) with fewer in-sync replicas
    than replicas, as the cluster's metadata says now: 0 once a returning broker caught up."""
    wanted = None if topics is None else set(topics)
    metadata = _quiet_admin(settings).list_topics(timeout=10)
    return sum(
        len(p.isrs) < len(p.replicas)
        for name, topic in metadata.topics.items()
        if wanted is None or name in wanted
        for p in topic.partitions.values()
    )


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


def services(
    settings: Settings, brokers: int | None = None
) -> list[Kafka | KafkaCluster | Postgres | Redis]:
    """The stack's services; Kafka as `brokers` brokers (`stack up`), or by default (`status`,
    `down`) as the stack's Kafka is: the cluster's nodes, each apart, when the cluster was the
    last started or runs, else the single broker."""
    kafka: list[Kafka | KafkaCluster]
    if brokers is None:
        cluster = KafkaCluster(settings)
        kafka = [*cluster.nodes] if cluster.in_use() else [Kafka(settings)]
    else:
        kafka = [Kafka(settings) if brokers == 1 else KafkaCluster(settings, brokers)]
    return [Postgres(settings), Redis(settings), *kafka]
