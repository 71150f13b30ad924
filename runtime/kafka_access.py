"""Who may do what on the broker: the SCRAM principals of the platform's components and their
ACLs, made idempotently by `microgrid stack up`, `microgrid run` and `microgrid kafka setup`.

The broker runs `StandardAuthorizer` with `allow.everyone.if.no.acl.found=false`: a principal
may touch only what an ACL here grants it. Each component gets exactly its topics and groups;
in particular only the validator writes `telemetry.valid`, only the query API (its outbox
relay) writes `alert-rules` and `control.commands`, and no component may create, delete or
configure topics (the admin principal does that).

aiokafka's admin client can neither manage SCRAM credentials nor ACLs, so this uses
confluent-kafka's (librdkafka), synchronously: it runs at setup time only.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from dataclasses import dataclass

from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialAlteration,
    UserScramCredentialDeletion,
    UserScramCredentialUpsertion,
)

from contracts import Groups, Topics
from contracts.topics import SITE_ID_PATTERN, site_group_prefix, site_topic
from runtime.kafka import ensure_topics, site_topic_specs
from runtime.settings import SERVICE_PRINCIPALS, Settings

SCRAM_ITERATIONS = 8192
TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Access:
    read: tuple[str, ...] = ()  # topics it consumes (READ; DESCRIBE comes with it)
    write: tuple[str, ...] = ()  # topics it produces to (WRITE)
    groups: tuple[str, ...] = ()  # consumer groups it joins and commits in
    group_prefixes: tuple[str, ...] = ()  # groups whose names start so (one per run)
    # transactional ids starting so (`<group>.<partition>`: the stateful processors' fencing)
    transactional_prefixes: tuple[str, ...] = ()


ACCESS: dict[str, Access] = {
    "gateway": Access(write=(Topics.TELEMETRY_RAW, Topics.CONTROL_RESULTS)),
    # also reads each site's telemetry and results topics (`site_acl_bindings`), and passes
    # the replies it finds there on to control.results once their devices check out
    "validator": Access(
        read=(Topics.TELEMETRY_RAW,),
        write=(
            Topics.TELEMETRY_VALID,
            Topics.TELEMETRY_DLQ,
            Topics.CONTROL_RESULTS,
            Topics.CONTROL_DLQ,
        ),
        groups=(Groups.VALIDATOR,),
    ),
    "alerter": Access(
        read=(Topics.TELEMETRY_VALID, Topics.ALERT_RULES, Topics.ALERTER_STATE),
        write=(Topics.ALERTS, Topics.ALERTS_DLQ, Topics.ALERTER_STATE),
        groups=(Groups.ALERTER,),
        transactional_prefixes=(Groups.ALERTER + ".",),
    ),
    # also writes each site's dispatch topic (`site_acl_bindings`)
    "controller": Access(
        read=(Topics.CONTROL_COMMANDS, Topics.CONTROL_RESULTS, Topics.CONTROLLER_STATE),
        write=(
            Topics.CONTROL_DISPATCH,
            Topics.CONTROL_EVENTS,
            Topics.CONTROL_DLQ,
            Topics.CONTROLLER_STATE,
        ),
        groups=(Groups.CONTROLLER,),
        transactional_prefixes=(Groups.CONTROLLER + ".",),
    ),
    "projector": Access(
        read=(Topics.TELEMETRY_VALID, Topics.ALERTS, Topics.CONTROL_EVENTS),
        write=(Topics.TELEMETRY_DLQ, Topics.ALERTS_DLQ, Topics.CONTROL_DLQ),
        groups=(Groups.TELEMETRY_PROJECTOR, Groups.ALERTS_PROJECTOR, Groups.CONTROL_PROJECTOR),
    ),
    # the outbox relay: rules, commands, acknowledgements, and the gateway's delivery events
    "api": Access(
        write=(Topics.ALERT_RULES, Topics.CONTROL_COMMANDS, Topics.ALERTS, Topics.CONTROL_EVENTS)
    ),
    # the simulator plays the Kafka devices of sites without topics of their own
    "simulator": Access(
        read=(Topics.CONTROL_DISPATCH,),
        write=(Topics.CONTROL_RESULTS,),
        group_prefixes=(Groups.SIMULATOR + ".",),
    ),
}
assert set(ACCESS) == set(SERVICE_PRINCIPALS), "every service principal has its access"


def admin_client(s: Settings) -> AdminClient:
    return AdminClient(librdkafka_config(s))


def librdkafka_config(s: Settings) -> dict[str, str | int | float | bool]:
    """`Settings.kafka_client` in librdkafka's terms (confluent-kafka, kcat -F)."""
    config: dict[str, str | int | float | bool] = {
        "bootstrap.servers": s.kafka_bootstrap_servers,
        "security.protocol": "SASL_SSL" if s.kafka_tls else "SASL_PLAINTEXT",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": s.kafka_username,
        "sasl.password": s.kafka_password,
    }
    if s.kafka_tls and s.kafka_tls_cafile:
        config["ssl.ca.location"] = s.kafka_tls_cafile
    return config


def _allow(
    user: str, kind: ResourceType, name: str, op: AclOperation, prefix: bool = False
) -> AclBinding:
    pattern = ResourcePatternType.PREFIXED if prefix else ResourcePatternType.LITERAL
    return AclBinding(kind, name, pattern, f"User:{user}", "*", op, AclPermissionType.ALLOW)


def acl_bindings(s: Settings) -> list[AclBinding]:
    """Every ACL the components need in `s`'s namespace."""
    out = []

    def allow(user: str, kind: ResourceType, name: str, op: AclOperation, prefix: bool) -> None:
        out.append(_allow(user, kind, name, op, prefix))

    topic, group = ResourceType.TOPIC, ResourceType.GROUP
    read, write = AclOperation.READ, AclOperation.WRITE
    for component, access in ACCESS.items():
        user, _ = s.service_credentials(component)
        for name in access.read:
            allow(user, topic, s.topic(name), read, prefix=False)
        for name in access.write:
            allow(user, topic, s.topic(name), write, prefix=False)
        for name in access.groups:
            allow(user, group, s.group(name), read, prefix=False)
        for name in access.group_prefixes:
            allow(user, group, s.group(name), read, prefix=True)
        for name in access.transactional_prefixes:
            allow(user, ResourceType.TRANSACTIONAL_ID, s.group(name), write, prefix=True)
    return out


class AccessError(RuntimeError):
    """The broker refused to set up principals or ACLs."""


def ensure_access(s: Settings, credentials: bool = True) -> None:
    """Create or update the components' SCRAM credentials (`credentials`) and their ACLs in
    `s`'s namespace. Idempotent; needs the admin principal."""
    admin = admin_client(s)
    try:
        if credentials:
            upserts: list[UserScramCredentialAlteration] = []
            for component in ACCESS:
                user, password = s.service_credentials(component)
                if password:  # a component whose password is not given here is left as it is
                    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS)
                    upserts.append(UserScramCredentialUpsertion(user, info, password.encode()))
            for future in admin.alter_user_scram_credentials(upserts).values():
                future.result(timeout=TIMEOUT_S)
        for future in admin.create_acls(acl_bindings(s)).values():
            future.result(timeout=TIMEOUT_S)
    except KafkaException as exc:
        raise AccessError(f"the broker refused the principals or ACLs: {exc}") from exc


def matching(b: AclBinding) -> AclBindingFilter:
    """The filter that finds (or deletes) exactly this ACL."""
    return AclBindingFilter(
        b.restype, b.name, b.resource_pattern_type, b.principal, b.host, b.operation,
        b.permission_type,
    )  # fmt: skip


def remove_access(s: Settings) -> None:
    """Delete the ACLs of `s`'s namespace (a test session's, when it ends)."""
    admin = admin_client(s)
    filters = [matching(b) for b in acl_bindings(s)]
    for future in admin.delete_acls(filters).values():
        future.result(timeout=TIMEOUT_S)


# Sites whose devices have Kafka clients: a principal of their own and three topics.


def check_site_id(site_id: str) -> None:
    """ValueError unless `site_id` can name a site's topics (SITE_ID_PATTERN)."""
    if not re.fullmatch(SITE_ID_PATTERN, site_id):
        raise ValueError(
            f"site id {site_id!r} cannot name Kafka topics: a site with Kafka devices needs an"
            " id of letters, digits, '_' and '-' (at most 64, starting with a letter or digit)"
        )


def site_acl_bindings(s: Settings, site_id: str) -> list[AclBinding]:
    """The components' ACLs on the site's topics: the validator reads its readings and
    replies, the controller writes its dispatch."""
    read, write = AclOperation.READ, AclOperation.WRITE
    validator, _ = s.service_credentials("validator")
    controller, _ = s.service_credentials("controller")
    return [
        _allow(validator, ResourceType.TOPIC, s.topic(site_topic(site_id, "telemetry")), read),
        _allow(validator, ResourceType.TOPIC, s.topic(site_topic(site_id, "results")), read),
        _allow(controller, ResourceType.TOPIC, s.topic(site_topic(site_id, "dispatch")), write),
    ]


def site_principal_bindings(s: Settings, site_id: str, user: str) -> list[AclBinding]:
    """A site principal's ACLs: write readings and replies, read its dispatch, in groups
    named `site.<site>.*`. Literal topic ACLs: a prefixed `site.<site>.` one would also let
    devices write their dispatch."""
    topic, read, write = ResourceType.TOPIC, AclOperation.READ, AclOperation.WRITE
    return [
        _allow(user, topic, s.topic(site_topic(site_id, "telemetry")), write),
        _allow(user, topic, s.topic(site_topic(site_id, "results")), write),
        _allow(user, topic, s.topic(site_topic(site_id, "dispatch")), read),
        _allow(user, ResourceType.GROUP, s.group(site_group_prefix(site_id)), read, prefix=True),
    ]


def create_site_principal(s: Settings, site_id: str) -> tuple[str, str]:
    """Make the site's topics and the components' ACLs on them (when missing), and a new
    SCRAM principal for the site with its ACLs; return (username, password). Needs the
    admin."""
    check_site_id(site_id)
    ensure_site_access(s, [site_id])
    user = f"{s.kafka_principal_prefix}site-{site_id}-{secrets.token_hex(4)}"
    password = secrets.token_urlsafe(32)
    admin = admin_client(s)
    info = ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, SCRAM_ITERATIONS)
    try:
        upsert = UserScramCredentialUpsertion(user, info, password.encode())
        for future in admin.alter_user_scram_credentials([upsert]).values():
            future.result(timeout=TIMEOUT_S)
    except KafkaException as exc:
        raise AccessError(f"the broker refused the site's principal: {exc}") from exc
    try:
        for future in admin.create_acls(site_principal_bindings(s, site_id, user)).values():
            future.result(timeout=TIMEOUT_S)
    except KafkaException as exc:
        revoke_site_principal(s, user)  # no principal is left behind that nothing records
        raise AccessError(f"the broker refused the site's ACLs: {exc}") from exc
    return user, password


def ensure_site_access(s: Settings, sites: list[str]) -> None:
    """The topics of `sites` and the components' ACLs on them, made again where missing (a
    rebuilt broker, a new namespace): without them the controller could not dispatch to a
    site's devices, nor the validator read them. Sites' principals are not restored: their
    passwords are nowhere but with their devices."""
    if not sites:
        return
    asyncio.run(ensure_topics(s, [spec for site in sites for spec in site_topic_specs(s, site)]))
    admin = admin_client(s)  # held: its futures fail once it is collected
    try:
        bindings = [b for site_id in sites for b in site_acl_bindings(s, site_id)]
        for future in admin.create_acls(bindings).values():
            future.result(timeout=TIMEOUT_S)
    except KafkaException as exc:
        raise AccessError(f"the broker refused the ACLs on sites' topics: {exc}") from exc


def revoke_site_principal(s: Settings, user: str) -> None:
    """Delete a site principal's credentials and every ACL naming it: its open connections
    lose their rights at once, and it can no longer log in."""
    admin = admin_client(s)
    everything = AclBindingFilter(
        ResourceType.ANY,
        None,  # type: ignore[arg-type]  # None matches any name (librdkafka)
        ResourcePatternType.ANY,
        f"User:{user}",
        None,  # type: ignore[arg-type]  # and any host
        AclOperation.ANY,
        AclPermissionType.ANY,
    )
    try:
        for future in admin.delete_acls([everything]).values():
            future.result(timeout=TIMEOUT_S)
        deletion = UserScramCredentialDeletion(user, ScramMechanism.SCRAM_SHA_512)
        for future in admin.alter_user_scram_credentials([deletion]).values():
            try:
                future.result(timeout=TIMEOUT_S)
            except KafkaException as exc:
                if "RESOURCE_NOT_FOUND" not in str(exc):  # gone already: nothing to delete
                    raise
    except KafkaException as exc:
        raise AccessError(f"the broker refused to revoke {user!r}: {exc}") from exc
