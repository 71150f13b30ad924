"""The broker knows who writes: anonymous clients and wrong passwords are refused, and each
component's principal may touch only its own topics and groups."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import (
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    KafkaError,
    TopicAuthorizationFailedError,
)

from contracts import Groups, Topics
from runtime.settings import Settings


def as_principal(s: Settings, component: str | None, password: str | None = None) -> Settings:
    t = s if component is None else s.as_service(component)
    return t if password is None else t.model_copy(update={"kafka_password": password})


async def produce(s: Settings, topic: str) -> None:
    producer = AIOKafkaProducer(**s.kafka_client, request_timeout_ms=5000)
    try:
        await producer.start()
        await producer.send_and_wait(s.topic(topic), b'{"probe": true}', key=b"probe")
    finally:
        await producer.stop()


async def consume(s: Settings, topic: str, group: str | None) -> None:
    consumer = AIOKafkaConsumer(
        s.topic(topic),
        **s.kafka_client,
        group_id=None if group is None else s.group(group),
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        request_timeout_ms=5000,
    )
    try:
        await consumer.start()
        await consumer.getmany(timeout_ms=2000)
        if group is not None:
            await consumer.commit()
    finally:
        await consumer.stop()


async def refusal(attempt: Coroutine[Any, Any, None]) -> BaseException | None:
    """The error the attempt ended with, None if it succeeded."""
    try:
        await asyncio.wait_for(attempt, 30)
    except (KafkaError, OSError) as exc:
        return exc
    return None


async def refused(attempt: Coroutine[Any, Any, None]) -> type[BaseException] | None:
    """The type of error the attempt ended with, None if it succeeded."""
    error = await refusal(attempt)
    return None if error is None else type(error)


def assert_refused_for(
    error: BaseException | None, caplog: pytest.LogCaptureFixture, reason: str
) -> None:
    """The client could not connect (not a timeout, not another failure), and the reason the
    client logged is `reason` (aiokafka raises only "Unable to bootstrap")."""
    assert isinstance(error, KafkaConnectionError), error
    assert reason in caplog.text, f"{reason} not in the client's log"


def test_anonymous_clients_and_wrong_passwords_are_refused(
    stack: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    async def anonymous_produce() -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=stack.kafka_bootstrap_servers, request_timeout_ms=5000
        )
        await producer.start()
        try:
            await producer.send_and_wait(stack.topic(Topics.TELEMETRY_VALID), b"x")
        finally:
            await producer.stop()

    async def anonymous_consume() -> None:
        consumer = AIOKafkaConsumer(
            stack.topic(Topics.TELEMETRY_VALID),
            bootstrap_servers=stack.kafka_bootstrap_servers,
            request_timeout_ms=5000,
        )
        await consumer.start()
        try:
            await consumer.getmany(timeout_ms=1000)
        finally:
            await consumer.stop()

    # the broker closes a connection that does not start with SASL: no bootstrap
    assert asyncio.run(refused(anonymous_produce())) is KafkaConnectionError
    assert asyncio.run(refused(anonymous_consume())) is KafkaConnectionError
    wrong = as_principal(stack, "validator", password="not-the-password")
    error = asyncio.run(refusal(produce(wrong, Topics.TELEMETRY_VALID)))
    assert_refused_for(error, caplog, "SaslAuthenticationFailed")
    # the marker that the broker answers at all: the validator itself may write there
    ok = as_principal(stack, "validator")
    assert asyncio.run(refused(produce(ok, Topics.TELEMETRY_VALID))) is None


def test_the_tls_listener_proves_itself_and_authenticates(
    stack: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    tls = stack.model_copy(
        update={
            "kafka_tls": True,
            "kafka_bootstrap_servers": f"127.0.0.1:{stack.kafka_tls_port}",
            "kafka_tls_cafile": str(stack.stack_dir / "kafka" / "tls" / "ca.pem"),
        }
    )
    assert (
        asyncio.run(refused(produce(as_principal(tls, "validator"), Topics.TELEMETRY_VALID)))
        is None
    )
    # over TLS too: wrong passwords and other principals' topics are refused
    wrong = as_principal(tls, "validator", password="not-the-password")
    error = asyncio.run(refusal(produce(wrong, Topics.TELEMETRY_VALID)))
    assert_refused_for(error, caplog, "SaslAuthenticationFailed")
    gateway = as_principal(tls, "gateway")
    assert (
        asyncio.run(refused(produce(gateway, Topics.TELEMETRY_VALID)))
        is TopicAuthorizationFailedError
    )
    # a client that does not trust the broker's certificate does not talk to it
    untrusting = as_principal(tls.model_copy(update={"kafka_tls_cafile": ""}), "validator")
    error = asyncio.run(refusal(produce(untrusting, Topics.TELEMETRY_VALID)))
    assert_refused_for(error, caplog, "CERTIFICATE_VERIFY_FAILED")


WRITES = [
    # (principal, topic, allowed)
    ("validator", Topics.TELEMETRY_VALID, True),
    ("gateway", Topics.TELEMETRY_VALID, False),
    ("projector", Topics.TELEMETRY_VALID, False),
    ("simulator", Topics.TELEMETRY_VALID, False),
    ("gateway", Topics.TELEMETRY_RAW, True),
    ("api", Topics.ALERT_RULES, True),
    ("gateway", Topics.ALERT_RULES, False),
    ("alerter", Topics.ALERT_RULES, False),
    ("simulator", Topics.ALERT_RULES, False),
    ("api", Topics.CONTROL_COMMANDS, True),
    ("gateway", Topics.CONTROL_COMMANDS, False),
    ("controller", Topics.CONTROL_COMMANDS, False),
    ("simulator", Topics.CONTROL_RESULTS, True),
    ("simulator", Topics.CONTROL_DISPATCH, False),
    ("projector", Topics.ALERTS, False),
]


@pytest.mark.parametrize(("principal", "topic", "allowed"), WRITES)
def test_each_component_writes_only_its_topics(
    stack: Settings, principal: str, topic: str, allowed: bool
) -> None:
    error = asyncio.run(refused(produce(as_principal(stack, principal), topic)))
    if allowed:
        assert error is None
    else:
        assert error is TopicAuthorizationFailedError


RUN = uuid.uuid4().hex[:6]
READS = [
    # (principal, topic, group, allowed, error when refused)
    ("validator", Topics.TELEMETRY_RAW, Groups.VALIDATOR, True, None),
    ("gateway", Topics.TELEMETRY_RAW, None, False, TopicAuthorizationFailedError),
    ("simulator", Topics.TELEMETRY_VALID, None, False, TopicAuthorizationFailedError),
    ("projector", Topics.TELEMETRY_VALID, Groups.VALIDATOR, False, GroupAuthorizationFailedError),
    (
        "simulator",
        Topics.CONTROL_DISPATCH,
        f"{Groups.SIMULATOR}.{uuid.uuid4().hex[:6]}",
        True,
        None,
    ),
    ("simulator", Topics.CONTROL_COMMANDS, None, False, TopicAuthorizationFailedError),
]


@pytest.mark.parametrize(("principal", "topic", "group", "allowed", "error"), READS)
def test_each_component_reads_only_its_topics_and_groups(
    stack: Settings,
    principal: str,
    topic: str,
    group: str | None,
    allowed: bool,
    error: type[BaseException] | None,
) -> None:
    got = asyncio.run(refused(consume(as_principal(stack, principal), topic, group)))
    assert got is error, (got, error)
    assert allowed == (got is None)


def test_no_component_may_create_or_delete_topics(stack: Settings) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    async def create(s: Settings) -> None:
        admin = AIOKafkaAdminClient(**s.kafka_client)
        await admin.start()
        try:
            name = s.topic(f"probe-{uuid.uuid4().hex[:6]}")
            response = await admin.create_topics([NewTopic(name, 1, 1)])
            for _, code, *_ in response.topic_errors:
                if code:
                    raise KafkaError(f"create_topics error {code}")
        finally:
            await admin.close()

    assert asyncio.run(refused(create(as_principal(stack, "api")))) is not None
