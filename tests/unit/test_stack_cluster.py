"""The local three-broker cluster's pure parts: its nodes' configs, how clients learn of it, and
that it and the single broker never run together."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from microgrid import stack
from runtime.settings import Settings


@pytest.fixture()
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings of a stack in tmp_path, with a TLS certificate already made (no keytool)."""
    for name in ("KAFKA_BOOTSTRAP_SERVERS", "TOPIC_REPLICATION_FACTOR", "STACK_DIR"):
        monkeypatch.delenv(name, raising=False)
    tls = tmp_path / "kafka" / "tls"
    tls.mkdir(parents=True)
    for name in ("broker.p12", "ca.pem"):
        (tls / name).write_text("")
    (tls / "keystore.password").write_text("secret")
    return Settings(
        stack_dir=tmp_path,
        kafka_bootstrap_servers="127.0.0.1:9092",
        kafka_controller_port=9093,
        kafka_tls_port=9094,
    )


def properties(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def test_node_i_listens_on_the_configured_ports_plus_100_times_i_minus_1(
    settings: Settings,
) -> None:
    assert [stack.node_ports(settings, i) for i in (1, 2, 3)] == [
        (9092, 9093, 9094),
        (9192, 9193, 9194),
        (9292, 9293, 9294),
    ]
    cluster = stack.KafkaCluster(settings)
    assert cluster.bootstrap_servers == "127.0.0.1:9092,127.0.0.1:9192,127.0.0.1:9292"


def test_a_node_is_broker_and_controller_with_its_own_ports_and_data_and_replication_3(
    settings: Settings,
) -> None:
    node = stack.KafkaCluster(settings).node(2)
    node.dir.mkdir(parents=True)
    props = properties(node._write_config())
    assert props["node.id"] == "2"
    assert props["process.roles"] == "broker,controller"
    assert props["controller.quorum.voters"] == (
        "1@127.0.0.1:9093,2@127.0.0.1:9193,3@127.0.0.1:9293"
    )
    assert props["listeners"] == (
        "SASL_PLAINTEXT://127.0.0.1:9192,SASL_SSL://127.0.0.1:9194,CONTROLLER://127.0.0.1:9193"
    )
    assert props["log.dirs"] == str(settings.stack_dir / "kafka-cluster" / "node-2" / "data")
    assert {k: v for k, v in props.items() if "replica" in k or "isr" in k or "unclean" in k} == {
        "default.replication.factor": "3",
        "min.insync.replicas": "2",
        "offsets.topic.replication.factor": "3",
        "transaction.state.log.replication.factor": "3",
        "transaction.state.log.min.isr": "2",
        "unclean.leader.election.enable": "false",
    }
    # authentication, authorisation and TLS exactly as on the single broker
    single = properties(stack.Kafka(settings)._write_config())
    same = [
        "sasl.enabled.mechanisms",
        "sasl.mechanism.inter.broker.protocol",
        "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config",
        "listener.name.sasl_ssl.ssl.keystore.location",
        "authorizer.class.name",
        "allow.everyone.if.no.acl.found",
        "super.users",
    ]
    assert {k: props[k] for k in same} == {k: single[k] for k in same}


def test_the_single_broker_keeps_its_config(settings: Settings) -> None:
    props = properties(stack.Kafka(settings)._write_config())
    assert props["node.id"] == "1"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:9093"
    assert props["log.dirs"] == str(settings.stack_dir / "kafka" / "data")
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["transaction.state.log.min.isr"] == "1"
    assert "default.replication.factor" not in props


def test_clients_learn_the_cluster_from_the_stack_dir_unless_the_environment_says_otherwise(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STACK_DIR", str(settings.stack_dir))
    assert (Settings().kafka_bootstrap_servers, Settings().topic_replication_factor) == (
        "127.0.0.1:9092",
        1,
    )
    cluster = stack.KafkaCluster(settings)
    cluster.home.mkdir(parents=True)
    cluster.env_file.write_text(
        f"KAFKA_BOOTSTRAP_SERVERS={cluster.bootstrap_servers}\nTOPIC_REPLICATION_FACTOR=3\n"
    )
    s = Settings()
    assert (s.kafka_bootstrap_servers, s.topic_replication_factor) == (
        cluster.bootstrap_servers,
        3,
    )
    assert s.kafka_port == 9092  # node 1: the stack's commands find the same ports
    monkeypatch.setenv("TOPIC_REPLICATION_FACTOR", "2")
    assert Settings().topic_replication_factor == 2


def test_status_and_down_see_the_cluster_once_it_was_started(settings: Settings) -> None:
    assert [svc.name for svc in stack.services(settings)][-1] == "kafka"
    assert isinstance(stack.services(settings, 3)[-1], stack.KafkaCluster)
    cluster = stack.KafkaCluster(settings)
    cluster.home.mkdir(parents=True)
    cluster.env_file.write_text("")
    assert [svc.name for svc in stack.services(settings)][-3:] == ["kafka-1", "kafka-2", "kafka-3"]
    assert isinstance(stack.services(settings, 1)[-1], stack.Kafka)


def test_the_single_broker_and_the_cluster_never_run_together(settings: Settings) -> None:
    cluster = stack.KafkaCluster(settings)
    node = cluster.node(2)
    node.dir.mkdir(parents=True)
    node.pidfile.write_text(str(os.getpid()))  # a live pid: "running"
    with pytest.raises(stack.StackError, match="run `microgrid stack down` first"):
        stack.Kafka(settings).up()
    node.pidfile.unlink()
    single = stack.Kafka(settings)
    single.pidfile.write_text(str(os.getpid()))
    with pytest.raises(stack.StackError, match="run `microgrid stack down` first"):
        cluster.up()
