"""`microgrid` command line: local stack, migrations, components, keys, devices, users,
simulator."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import os
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    import psycopg

from microgrid.deadletters import dlq_app
from runtime.settings import Settings, get_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
stack_app = typer.Typer(no_args_is_help=True, help="Local Kafka, PostgreSQL and Redis.")
keys_app = typer.Typer(no_args_is_help=True, help="Device ingest keys.")
contracts_app = typer.Typer(no_args_is_help=True, help="OpenAPI and AsyncAPI documents.")
app.add_typer(stack_app, name="stack")
app.add_typer(keys_app, name="keys")
users_app = typer.Typer(no_args_is_help=True, help="Users of the query API.")
app.add_typer(users_app, name="users")
app.add_typer(contracts_app, name="contracts")
kafka_app = typer.Typer(no_args_is_help=True, help="The broker's topics, principals and ACLs.")
app.add_typer(kafka_app, name="kafka")
devices_app = typer.Typer(
    no_args_is_help=True, help="The device registry: which site owns a device."
)
app.add_typer(devices_app, name="devices")
app.add_typer(dlq_app, name="dlq")


def _fail(message: str) -> NoReturn:
    typer.secho(message, fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


@stack_app.command("up")
def stack_up(
    brokers: Annotated[
        int,
        typer.Option(
            help="Kafka brokers: 1, or 3 for a KRaft cluster (node i on the Kafka ports"
            " + 100 * (i - 1), data under STACK_DIR/kafka-cluster; `stack down` before switching)"
        ),
    ] = 1,
) -> None:
    """Start Kafka, PostgreSQL and Redis (idempotent) and create the topics."""
    from microgrid.stack import CLUSTER_SIZE, KafkaCluster, StackError, services

    if brokers not in (1, CLUSTER_SIZE):
        _fail(f"--brokers {brokers}: give 1 or {CLUSTER_SIZE}")
    s = get_settings()
    cluster: KafkaCluster | None = None
    for svc in services(s, brokers):
        try:
            svc.up()
        except StackError as exc:
            _fail(f"{svc.name}: {exc}")
        if isinstance(svc, KafkaCluster):
            cluster = svc
        for st in svc.statuses() if isinstance(svc, KafkaCluster) else [svc.status()]:
            typer.echo(f"{st.name:<9} up on 127.0.0.1:{st.port} ({st.detail})")
    get_settings.cache_clear()  # the cluster's clients file was written, or removed
    s = get_settings() if cluster is None else cluster.client_settings()
    if cluster is not None:
        overridden = [
            f"{name}={os.environ[name]}"
            for name, value in [
                ("KAFKA_BOOTSTRAP_SERVERS", s.kafka_bootstrap_servers),
                ("TOPIC_REPLICATION_FACTOR", str(s.topic_replication_factor)),
            ]
            if os.environ.get(name, value) != value
        ]
        typer.echo(
            f"clients: KAFKA_BOOTSTRAP_SERVERS={s.kafka_bootstrap_servers}"
            f" TOPIC_REPLICATION_FACTOR={s.topic_replication_factor}, in {cluster.env_file}"
            " (the settings read it after .env)"
        )
        if overridden:
            typer.secho(
                f"your environment overrides it ({', '.join(overridden)}): export"
                f" KAFKA_BOOTSTRAP_SERVERS={s.kafka_bootstrap_servers}"
                f" TOPIC_REPLICATION_FACTOR={s.topic_replication_factor}",
                fg=typer.colors.YELLOW,
                err=True,
            )
    created = _ensure_topics(s)
    if created:
        typer.echo(f"topics created: {', '.join(created)}")


@stack_app.command("down")
def stack_down(
    purge: Annotated[bool, typer.Option(help="also delete the services' data")] = False,
) -> None:
    """Stop the services this stack started (nothing else)."""
    import shutil

    from microgrid.stack import services

    s = get_settings()
    for svc in reversed(services(s)):
        svc.down()
        typer.echo(f"{svc.name:<9} stopped")
        if purge:
            shutil.rmtree(svc.data, ignore_errors=True)
            typer.echo(f"{svc.name:<9} data deleted ({svc.data})")
    if purge:  # both Kafka modes' data, whichever ran last
        for other in (s.stack_dir / "kafka" / "data", s.stack_dir / "kafka-cluster"):
            if other.exists():
                shutil.rmtree(other, ignore_errors=True)
                typer.echo(f"{'kafka':<9} data deleted ({other})")


@stack_app.command("status")
def stack_status() -> None:
    """Say what runs on which port."""
    from microgrid.stack import services

    all_up = True
    for svc in services(get_settings()):
        st = svc.status()
        all_up &= st.running
        state = "up" if st.running else "down"
        pid = f" pid {st.pid}" if st.pid else ""
        typer.echo(f"{st.name:<9} {state:<5} 127.0.0.1:{st.port} {st.detail}{pid}")
    raise typer.Exit(0 if all_up else 3)


@app.command()
def migrate() -> None:
    """Apply pending SQL migrations (idempotent)."""
    import psycopg

    from runtime.db import migrate as apply

    try:
        applied = apply(get_settings())
    except psycopg.OperationalError as exc:
        _fail(f"cannot reach PostgreSQL ({exc}); is the stack up (`microgrid stack up`)?")
    typer.echo(f"applied: {', '.join(applied)}" if applied else "database is up to date")


@app.command()
def run(
    only: Annotated[
        str | None, typer.Option(help="comma-separated components (default: all)")
    ] = None,
    replicas: Annotated[
        str | None,
        typer.Option(
            help="members per consumer group, e.g. validator=2,alerter=2,controller=2,"
            "projector=2 (default: one each)"
        ),
    ] = None,
) -> None:
    """Run the components, each in its own supervised process. Ctrl-C stops them."""
    from microgrid.components import COMPONENTS

    names = list(COMPONENTS) if not only else [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown:
        _fail(f"unknown component(s): {', '.join(unknown)}; available: {', '.join(COMPONENTS)}")
    _supervise(names, _replicas(replicas, names) if replicas else {})


def _replicas(text: str, names: list[str]) -> dict[str, int]:
    """`NAME=N,...` for the consumer groups among `names`, N from 1 to the partition count."""
    from microgrid.supervisor import GROUP_METRICS_PORTS

    s = get_settings()
    limit = s.device_topic_partitions
    out: dict[str, int] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, count = part.partition("=")
        name = name.strip()
        if name not in GROUP_METRICS_PORTS:
            _fail(
                f"--replicas {part!r}: only consumer groups have members:"
                f" {', '.join(GROUP_METRICS_PORTS)} (the gateway runs GATEWAY_WORKERS"
                " processes of its own)"
            )
        if name not in names:
            _fail(f"--replicas {part!r}: {name} is not among the components to run")
        if not count.strip().isdigit() or not 1 <= int(count) <= limit:
            _fail(
                f"--replicas {part!r}: give {name}=N with N from 1 to {limit}"
                f" (DEVICE_TOPIC_PARTITIONS: more members than partitions would sit idle)"
            )
        out[name] = int(count)
    return out


def _supervise(names: list[str], replicas: dict[str, int] | None = None) -> None:
    from microgrid.supervisor import GROUP_METRICS_PORTS, Supervisor
    from runtime.logs import configure_logging

    s = get_settings()
    if reason := s.environment_problem:
        _fail(f"refusing to run the platform: {reason}")
    configure_logging("supervisor", s.log_level)
    if s.kafka_password:  # the admin's credentials: topics and ACLs are made sure of here
        _ensure_topics(s)
        _check_partitions(s)
    ports = {v: getattr(s, v.lower()) for v in GROUP_METRICS_PORTS.values()}
    raise typer.Exit(Supervisor(names, replicas=replicas, ports=ports).run())


def _check_partitions(s: Settings) -> None:
    """Refuse to run while DEVICE_TOPIC_PARTITIONS and the topics keyed by device disagree
    (after `kafka grow`, before the setting follows): the stateful processors would refuse."""
    from runtime.kafka import PartitionMismatch, check_device_partitions, device_topic_specs

    try:
        asyncio.run(check_device_partitions(s, [spec.name for spec in device_topic_specs(s)]))
    except PartitionMismatch as exc:
        _fail(f"refusing to run the platform: {exc}")


def _ensure_topics(s: Settings, credentials: bool = True) -> list[str]:
    """Topics, the components' principals (with `credentials`) and their ACLs, as the admin;
    returns the topics created now."""
    from aiokafka.errors import KafkaError

    from runtime.kafka import ensure_topics
    from runtime.kafka_access import AccessError, ensure_access, ensure_site_access

    try:
        created = asyncio.run(ensure_topics(s))
        ensure_access(s, credentials=credentials)
        ensure_site_access(s, _kafka_sites(s))
    except (KafkaError, AccessError) as exc:
        _fail(f"Kafka at {s.kafka_bootstrap_servers} is not usable ({exc!r}); is the stack up?")
    return created


def _kafka_sites(s: Settings) -> list[str]:
    """The sites with topics of their own (a Kafka principal was made for them); none while
    the database is unreachable or not migrated yet."""
    import psycopg

    try:
        with psycopg.connect(s.database_url, connect_timeout=5) as conn:
            rows = conn.execute("SELECT DISTINCT site_id FROM kafka_principals ORDER BY 1")
            return [row[0] for row in rows]
    except psycopg.Error:
        return []


@app.command()
def dev() -> None:
    """Every component plus the simulator (what `make dev` runs)."""
    from microgrid.components import COMPONENTS

    s = get_settings()
    if reason := s.environment_problem:
        _fail(f"refusing to run the platform: {reason}")
    typer.echo(
        "\n".join(
            [
                "microgrid platform starting:",
                f"  ingest gateway  http://{s.gateway_host}:{s.gateway_port}/api/v1/telemetry",
                f"  query API       http://{s.api_host}:{s.api_port}/api/v1/devices",
                f"  Kafka           {s.kafka_bootstrap_servers}",
                f"  PostgreSQL      {s.database_url}",
                f"  simulator       {s.sim_devices} devices, {s.sim_rate:g} reading/s each",
                "Ctrl-C stops everything.",
            ]
        )
    )
    _supervise([*COMPONENTS, "simulator"])


@kafka_app.command("setup")
def kafka_setup(
    credentials: Annotated[
        bool,
        typer.Option(
            "--credentials/--no-credentials",
            help="also create or update the components' SCRAM credentials (off where the"
            " broker's own tools make users, e.g. Redpanda's rpk)",
        ),
    ] = True,
) -> None:
    """Create the topics, the components' principals (microgrid-<component>, passwords from
    KAFKA_<COMPONENT>_PASSWORD) and their ACLs, as the admin (KAFKA_USERNAME,
    KAFKA_PASSWORD). Idempotent; `stack up` and `run` do it on the local stack."""
    created = _ensure_topics(get_settings(), credentials)
    if created:
        typer.echo(f"topics created: {', '.join(created)}")
    typer.echo("principals and ACLs are set" if credentials else "ACLs are set")


@kafka_app.command("grow")
def kafka_grow(
    partitions: Annotated[
        int, typer.Option(min=1, help="the new partition count of every topic keyed by device")
    ],
    yes: Annotated[bool, typer.Option("--yes", help="do not ask before changing")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="check and say what it would do; change nothing")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Raise every topic keyed by device to more partitions (more members per consumer group),
    with the platform stopped: refuses while a group has members or records left to read; moves
    the alerter's and controller's state to the partitions its devices map to; new partitions
    start at offset 0 for every group. Then set DEVICE_TOPIC_PARTITIONS to the new count."""
    from microgrid.partitions import command

    raise typer.Exit(command(get_settings(), partitions, yes=yes, dry_run=dry_run, as_json=as_json))


@keys_app.command("create")
def keys_create(
    site: Annotated[str, typer.Option(help="site the key may send for")],
    kafka: Annotated[
        bool,
        typer.Option(
            "--kafka",
            help="a Kafka principal for the site's devices instead: its own topics"
            " site.SITE.telemetry, .dispatch and .results (made when missing)",
        ),
    ] = False,
) -> None:
    """Print one new device ingest key for SITE on stdout (and nothing else); with --kafka,
    a new Kafka principal's client configuration (librdkafka properties, e.g. `kcat -F`)."""
    import msgspec
    import psycopg

    from contracts.readings import Identifier
    from runtime.keys import create_key

    try:
        msgspec.convert(site, Identifier)
    except msgspec.ValidationError:
        _fail(f"invalid site id {site!r}: letters, digits and . _ : - (at most 64)")
    if kafka:
        _create_kafka_principal(site)
        return
    try:
        with psycopg.connect(get_settings().database_url, autocommit=True) as conn:
            key = create_key(conn, site)
    except psycopg.OperationalError as exc:
        _fail(f"cannot reach PostgreSQL ({exc}); is the stack up (`microgrid stack up`)?")
    sys.stdout.write(key + "\n")


def _create_kafka_principal(site: str) -> None:
    """The site's topics and ACLs, a new principal on the broker, and its record, in that
    order; a principal whose record cannot be stored is removed again."""
    from aiokafka.errors import KafkaError

    from contracts.topics import site_group_prefix, site_topic
    from runtime.kafka_access import (
        AccessError,
        check_site_id,
        create_site_principal,
        librdkafka_config,
        revoke_site_principal,
    )
    from runtime.keys import record_kafka_principal

    s = get_settings()
    try:
        check_site_id(site)
    except ValueError as exc:
        _fail(str(exc))
    with _key_db() as conn:  # PostgreSQL first: no principal is made that cannot be recorded
        try:
            user, password = create_site_principal(s, site)
        except (KafkaError, AccessError) as exc:
            _fail(f"Kafka at {s.kafka_bootstrap_servers} refused ({exc!r}); is the stack up?")
        try:
            record_kafka_principal(conn, user, site)
        except Exception:
            revoke_site_principal(s, user)
            raise
    topics = {
        kind: s.topic(site_topic(site, kind)) for kind in ("telemetry", "dispatch", "results")
    }
    sys.stdout.write(
        "\n".join(
            [
                f"# Kafka principal of site {site}: shown once, keep it secret",
                f"# produce readings to {topics['telemetry']} and replies to"
                f" {topics['results']}, keyed by device id;",
                f"# consume commands from {topics['dispatch']} in a group named"
                f" {s.group(site_group_prefix(site))}<anything>",
                *(
                    f"{name}={value}"
                    for name, value in librdkafka_config(s).items()
                    if not name.startswith("sasl.")
                ),
                "sasl.mechanisms=SCRAM-SHA-512",
                f"sasl.username={user}",
                f"sasl.password={password}",
                "",
            ]
        )
    )


def _key_db() -> psycopg.Connection:
    import psycopg

    try:
        return psycopg.connect(get_settings().database_url, autocommit=True)
    except psycopg.OperationalError as exc:
        _fail(f"cannot reach PostgreSQL ({exc}); is the stack up (`microgrid stack up`)?")


@users_app.command("set")
def users_set(
    username: Annotated[str, typer.Argument(help="login name")],
    role: Annotated[str, typer.Option(help="admin, operator or viewer")],
    sites: Annotated[
        str | None,
        typer.Option(help="comma-separated sites an operator or viewer sees and acts on"),
    ] = None,
    all_sites: Annotated[
        bool, typer.Option("--all-sites", help="see and act on every site (the default)")
    ] = False,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password from stdin")
    ] = False,
) -> None:
    """Create a user of the query API, or set an existing one's role, sites and password
    (argon2 hash stored). The password is asked for twice, or read from stdin. Without
    --sites or --all-sites a new user sees every site and an existing one keeps its sites."""
    import msgspec

    from contracts.readings import Identifier
    from query_api.auth import HASHER

    if role not in ("admin", "operator", "viewer"):
        _fail(f"unknown role {role!r}: admin, operator or viewer")
    if not 1 <= len(username) <= 100:
        _fail("a username has 1 to 100 characters")
    scope: list[str] | None = None
    if sites is not None:
        if all_sites:
            _fail("give --sites or --all-sites, not both")
        if role == "admin":
            _fail("an admin sees every site: --sites is for operators and viewers")
        scope = sorted({part.strip() for part in sites.split(",") if part.strip()})
        if not scope:
            _fail("--sites needs at least one site")
        for site in scope:
            try:
                msgspec.convert(site, Identifier)
            except msgspec.ValidationError:
                _fail(f"invalid site id {site!r}: letters, digits and . _ : - (at most 64)")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = typer.prompt("password", hide_input=True, confirmation_prompt=True)
    if len(password) < 12:
        _fail("a password has at least 12 characters")
    keep = sites is None and not all_sites and role != "admin"  # an existing user's sites
    with _key_db() as conn:
        row = conn.execute(
            "INSERT INTO users (username, role, password_hash, sites) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (username) DO UPDATE SET role = EXCLUDED.role,"
            " password_hash = EXCLUDED.password_hash, updated_at = now(),"
            " sites = CASE WHEN %s THEN users.sites ELSE EXCLUDED.sites END"
            " RETURNING (xmax = 0), sites",
            (username, role, HASHER.hash(password), scope, keep),
        ).fetchone()
    assert row is not None
    seen = "every site" if row[1] is None else "sites " + ", ".join(row[1])
    typer.echo(f"{'created' if row[0] else 'updated'} {username} ({role}, {seen})", err=True)


def _admin_name() -> str:
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def _plain(struct: Any) -> dict[str, Any]:
    """A registry record as JSON-ready fields, times in ISO 8601."""
    import msgspec

    return {
        k: v.isoformat() if isinstance(v, datetime) else v
        for k, v in msgspec.structs.asdict(struct).items()
    }


def _table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


@devices_app.command("add")
def devices_add(
    device: Annotated[str, typer.Argument(help="device id")],
    site: Annotated[str, typer.Option(help="the site that owns it")],
) -> None:
    """Register DEVICE to SITE: only keys of SITE may then send its readings and take its
    commands. Registering it again to the same site changes nothing."""
    from runtime.devices import RegistryError, register_device

    with _key_db() as conn:
        try:
            reg, new = register_device(conn, device, site, _admin_name())
        except RegistryError as exc:
            _fail(str(exc))
    typer.echo(
        f"registered {reg.device_id} to site {reg.site_id}"
        if new
        else f"{reg.device_id} already belongs to site {reg.site_id} (since {reg.registered_at})"
    )


@devices_app.command("move")
def devices_move(
    device: Annotated[str, typer.Argument(help="device id")],
    to: Annotated[str, typer.Option("--to", help="the site that owns it from now on")],
    reason: Annotated[str, typer.Option(help="why (recorded with the move)")],
) -> None:
    """Give a registered device to another site, recorded with who and why. Gateways and
    validators forget the old owner as soon as this commits."""
    from runtime.devices import RegistryError, move_device

    with _key_db() as conn:
        try:
            move = move_device(conn, device, to, _admin_name(), reason)
        except RegistryError as exc:
            _fail(str(exc))
    typer.echo(f"moved {move.device_id} from site {move.from_site} to {move.to_site}")


@devices_app.command("list")
def devices_list(
    site: Annotated[str | None, typer.Option(help="only this site's devices")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON array")] = False,
) -> None:
    """Registered devices: id, site, when and how each was registered."""
    from runtime.devices import list_registrations

    with _key_db() as conn:
        found = list_registrations(conn, site)
    if as_json:
        sys.stdout.write(json.dumps([_plain(r) for r in found]) + "\n")
        return
    rows = [("DEVICE", "SITE", "REGISTERED", "BY")]
    for r in found:
        at = r.registered_at.isoformat(timespec="seconds")
        rows.append((r.device_id, r.site_id, at, r.registered_by))
    _table(rows)


@devices_app.command("show")
def devices_show(
    device: Annotated[str, typer.Argument(help="device id")],
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object")] = False,
) -> None:
    """A device's registration and every move between sites."""
    from runtime.devices import moves_of, registration

    with _key_db() as conn:
        reg = registration(conn, device)
        moves = moves_of(conn, device)
    if reg is None:
        _fail(f"device {device!r} is not registered")
    if as_json:
        doc = {**_plain(reg), "moves": [_plain(m) for m in moves]}
        sys.stdout.write(json.dumps(doc) + "\n")
        return
    at = reg.registered_at.isoformat(timespec="seconds")
    typer.echo(f"{reg.device_id}: site {reg.site_id}, registered {at} by {reg.registered_by}")
    for m in moves:
        when = m.moved_at.isoformat(timespec="seconds")
        typer.echo(f"  {when}  {m.from_site} -> {m.to_site}  by {m.moved_by}: {m.reason}")


def _duration(text: str) -> timedelta:
    """`90s`, `15m`, `1h`, `2d` or a number of seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise typer.BadParameter(f"{text!r}: give e.g. 90s, 15m, 1h or 2d") from None
    if seconds < 0:
        raise typer.BadParameter("must not be negative")
    return timedelta(seconds=seconds)


@keys_app.command("list")
def keys_list(
    site: Annotated[str | None, typer.Option(help="only this site's keys")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON array")] = False,
    kafka: Annotated[bool, typer.Option("--kafka", help="the Kafka principals")] = False,
) -> None:
    """Every key (id, prefix, site, created, revoked): never the key or its hash; with
    --kafka, the sites' Kafka principals instead (never their passwords)."""
    from runtime.keys import list_keys

    if kafka:
        _list_kafka_principals(site, as_json)
        return
    with _key_db() as conn:
        keys = list_keys(conn, site)
    if as_json:
        sys.stdout.write(json.dumps([k.as_json() for k in keys]) + "\n")
        return
    rows = [("ID", "PREFIX", "SITE", "CREATED", "REVOKED", "STATUS")]
    for k in keys:
        revoked = k.revoked_at.isoformat(timespec="seconds") if k.revoked_at else "-"
        status = "revoked" if not k.active else "expiring" if k.revoked_at else "active"
        created = k.created_at.isoformat(timespec="seconds")
        rows.append((str(k.id), k.prefix, k.site, created, revoked, status))
    _table(rows)


def _list_kafka_principals(site: str | None, as_json: bool) -> None:
    from runtime.keys import list_kafka_principals

    with _key_db() as conn:
        principals = list_kafka_principals(conn, site)
    if as_json:
        sys.stdout.write(json.dumps([p.as_json() for p in principals]) + "\n")
        return
    rows = [("ID", "USERNAME", "SITE", "CREATED", "REVOKED", "STATUS")]
    for p in principals:
        revoked = p.revoked_at.isoformat(timespec="seconds") if p.revoked_at else "-"
        created = p.created_at.isoformat(timespec="seconds")
        status = "active" if p.active else "revoked"
        rows.append((str(p.id), p.username, p.site, created, revoked, status))
    _table(rows)


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[
        str,
        typer.Argument(
            help="the key's id, its prefix (mgk_...) or the key; or a Kafka principal's username"
        ),
    ],
) -> None:
    """Revoke a key now: the gateway refuses it within INGEST_KEY_CACHE_S. A Kafka principal
    loses its ACLs and credentials at once."""
    from runtime.keys import KeyNotFound, find_kafka_principal, revoke_key

    with _key_db() as conn:
        if (principal := find_kafka_principal(conn, key.strip())) is not None:
            _revoke_kafka_principal(conn, principal.username)
            return
        try:
            done = revoke_key(conn, key)
        except KeyNotFound as exc:
            _fail(str(exc))
    typer.echo(f"revoked key {done.id} ({done.prefix}, site {done.site}) at {done.revoked_at}")


def _revoke_kafka_principal(conn: psycopg.Connection, username: str) -> None:
    from runtime.kafka_access import AccessError, revoke_site_principal
    from runtime.keys import mark_kafka_principal_revoked

    s = get_settings()
    try:
        revoke_site_principal(s, username)  # the broker first: the record follows what is true
    except AccessError as exc:
        _fail(str(exc))
    done = mark_kafka_principal_revoked(conn, username)
    typer.echo(f"revoked Kafka principal {done.username} (site {done.site}) at {done.revoked_at}")


@keys_app.command("rotate")
def keys_rotate(
    key: Annotated[str, typer.Argument(help="the key's id, its prefix (mgk_...) or the key")],
    grace: Annotated[
        str, typer.Option(help="keep the old key working this long (90s, 15m, 1h, 2d)")
    ] = "0s",
) -> None:
    """Print a new key for the same site on stdout (nothing else) and revoke the old one, now
    or after --grace."""
    from runtime.keys import KeyNotFound, find_kafka_principal, rotate_key

    after = _duration(grace)
    with _key_db() as conn:
        if find_kafka_principal(conn, key.strip()) is not None:
            _fail(
                "a Kafka principal is not rotated in place: create another with"
                " `keys create --site SITE --kafka`, move the devices to it, then revoke this one"
            )
        try:
            new, info, old = rotate_key(conn, key, after)
        except KeyNotFound as exc:
            _fail(str(exc))
    sys.stdout.write(new + "\n")
    typer.echo(
        f"new key {info.id} ({info.prefix}) for site {info.site}; old key {old.id}"
        f" ({old.prefix}) revoked at {old.revoked_at}",
        err=True,
    )


@app.command()
def bench(
    profile: Annotated[str, typer.Option(help="baseline | stress | max")] = "stress",
    duration: Annotated[
        float, typer.Option(min=1, help="seconds of load (per step for max)")
    ] = 300,
    report: Annotated[
        Path, typer.Option(help="JSON report path; a PNG chart goes beside it")
    ] = Path("reports/bench.json"),
    transport: Annotated[
        str, typer.Option(help="http (gateway) or kafka (telemetry.raw)")
    ] = "http",
    min_success_rate: Annotated[float, typer.Option(min=0, max=1)] = 0.99,
    max_p95_latency_ms: Annotated[float, typer.Option(min=1)] = 1500.0,
    measure_limit: Annotated[bool, typer.Option(help="measure the raw Kafka limit first")] = True,
    rate: Annotated[
        float | None, typer.Option(min=1, help="readings/min instead of the profile's")
    ] = None,
) -> None:
    """Load the running platform, wait until PostgreSQL has it all, check the SLO."""
    from benchmarks.harness import benchmark, save
    from benchmarks.profiles import PROFILES, Options

    if profile not in PROFILES:
        _fail(f"unknown profile {profile!r}; one of {', '.join(PROFILES)}")
    if transport not in ("http", "kafka"):
        _fail("transport is http or kafka")
    chosen = PROFILES[profile]
    if rate is not None:
        chosen = dataclasses.replace(chosen, per_min=rate)
    options = Options(
        chosen,
        duration,
        transport,
        min_success_rate,
        max_p95_latency_ms,
        measure_limit=measure_limit,
    )

    def echo(text: str, nl: bool = True) -> None:
        typer.echo(text, nl=nl, err=True)

    import uvloop  # the load generator's event loop: its CPU is the platform's loss

    result = uvloop.run(benchmark(get_settings(), options, echo))
    chart = save(result, report)
    typer.echo(json.dumps(result.to_dict(), indent=2))
    echo(f"report: {report}  chart: {chart}")
    slo = result.slo
    verdict = "passed" if slo["passed"] else "FAILED"
    echo(
        f"SLO {verdict}: success {slo['success_rate']:.4f} (min {slo['min_success_rate']}),"
        f" p95 {result.latency_ms['p95']} ms (max {slo['max_p95_latency_ms']})"
    )
    raise typer.Exit(0 if slo["passed"] else 1)


@app.command()
def replay(
    topic: Annotated[
        str, typer.Option(help="telemetry.valid | telemetry.raw | alerts | control.events")
    ],
    start: Annotated[
        str,
        typer.Option(
            "--from", help="start, included: RFC 3339, a date (UTC), or a duration ago (2h, 7d)"
        ),
    ],
    out: Annotated[Path, typer.Option(help="FILE.jsonl, FILE.csv or FILE.parquet")],
    end: Annotated[str, typer.Option("--to", help="end, excluded (same forms)")] = "now",
    site: Annotated[str | None, typer.Option(help="only this site's data")] = None,
    device: Annotated[str | None, typer.Option(help="only this device's data")] = None,
    lateness: Annotated[
        str | None,
        typer.Option(
            help="how late data may have come after --to (default MAX_READING_AGE_S): less"
            " reads less of the log, and misses what came later"
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="replace FILE if it exists")] = False,
) -> None:
    """Write a topic's records for a time range of their data to a file: readings by their
    `ts` (one row per reading identity), alert and control events by their time. Reads
    without a consumer group and commits nothing."""
    from rich.console import Console

    from microgrid.logread import BadTime, parse_time
    from microgrid.replay import ReplayError, Selection
    from microgrid.replay import replay as run_replay

    now = datetime.now(UTC)
    try:
        sel = Selection(
            topic,
            parse_time(start, now),
            parse_time(end, now),
            site,
            device,
            _duration(lateness) if lateness is not None else None,
        )
    except BadTime as exc:
        _fail(str(exc))
    console = Console(stderr=True)
    # as in the components (microgrid.components.tune_gc): a million readings to Parquet took
    # 12.0 s with the default young-generation threshold and 10.6 s with this one (medians of 3)
    gc.set_threshold(50_000, 20, 100)
    try:
        summary = asyncio.run(run_replay(get_settings(), sel, out, console, force))
    except ReplayError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted: no file written")
    what = "readings" if topic.startswith("telemetry.") else "events"
    extra = []
    if summary.duplicates:
        extra.append(f"{summary.duplicates:,} repeated identities left out")
    if summary.undecodable:
        extra.append(f"{summary.undecodable:,} records without a valid {what[:-1]} skipped")
    console.print(  # one line: scripts and logs grep it
        f"{summary.rows:,} {what} from {summary.records:,} records to {out}"
        f" in {summary.seconds:.1f} s ({summary.rate:,.0f} {what}/s)"
        + (f"; {'; '.join(extra)}" if extra else ""),
        soft_wrap=True,
    )


@app.command()
def backtest(
    rule: Annotated[
        Path, typer.Option(help="RULE.json: one rule as the API takes it or answers it")
    ],
    start: Annotated[
        str,
        typer.Option(
            "--from", help="start, included: RFC 3339, a date (UTC), or a duration ago (2h, 7d)"
        ),
    ],
    end: Annotated[str, typer.Option("--to", help="end, excluded (same forms)")] = "now",
    site: Annotated[str | None, typer.Option(help="only this site's readings")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON document on stdout")] = False,
) -> None:
    """The alerts a rule would have raised over a time range of `telemetry.valid`, evaluated
    by the alerter's own code, per device. Reads without a consumer group; changes nothing."""
    from rich.console import Console
    from rich.table import Table

    from microgrid.backtest import BacktestError, load_rule, peak_unit
    from microgrid.backtest import backtest as run_backtest
    from microgrid.logread import BadTime, parse_time

    now = datetime.now(UTC)
    try:
        rule_id, spec = load_rule(rule)
        since, until = parse_time(start, now), parse_time(end, now)
    except (BacktestError, BadTime) as exc:
        _fail(str(exc))
    err = Console(stderr=True)
    try:
        result = asyncio.run(run_backtest(get_settings(), rule_id, spec, since, until, site, err))
    except BacktestError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted")
    report = result.report
    if as_json:
        import msgspec

        sys.stdout.write(msgspec.json.format(msgspec.json.encode(report)).decode() + "\n")
        return

    def when(t: datetime | None) -> str:
        return "open" if t is None else t.strftime("%Y-%m-%dT%H:%M:%S.%f")[:23] + "Z"

    out = Console(width=None if sys.stdout.isatty() else 160)  # piped: whole lines
    if report.alerts:
        table = Table("device", "opened", "cleared", f"peak ({peak_unit(spec)})")
        for column in table.columns[:3]:
            column.overflow, column.no_wrap = "fold", True
        for a in report.alerts:
            peak = "" if a.peak is None else f"{a.peak:.6g}"
            table.add_row(a.device_id, when(a.opened_at), when(a.cleared_at), peak)
        out.print(table)
    n = report.summary
    out.print(  # one line: scripts and logs grep it
        f"rule {rule_id} ({spec.name}): {n.alerts:,} alerts opened, {n.open_at_end:,} still"
        f" open at --to, on {n.devices:,} devices; {n.readings:,} readings evaluated"
        f" ({n.ignored:,} older than their device's newest, ignored); read {result.records:,}"
        f" records in {result.seconds:.1f} s",
        soft_wrap=True,
    )


@contracts_app.command("generate")
def contracts_generate() -> None:
    """Write the OpenAPI and AsyncAPI documents under contracts/ from the code."""
    from microgrid.specs import generate

    for path in generate():
        typer.echo(f"wrote {path}")


@contracts_app.command("check")
def contracts_check() -> None:
    """Fail when the committed documents differ from what the code generates."""
    from microgrid.specs import drift

    stale = drift()
    for name, diff in stale.items():
        typer.echo(diff, err=True)
        typer.secho(f"{name} is out of date", fg=typer.colors.RED, err=True)
    if stale:
        _fail("run `microgrid contracts generate` and commit the result")
    typer.echo("contracts are up to date")


@app.command()
def simulate(
    devices: Annotated[int, typer.Option(min=1, help="number of devices")] = 48,
    rate: Annotated[float, typer.Option(min=0.001, help="readings per second per device")] = 1.0,
    duration: Annotated[float | None, typer.Option(help="seconds (default: until Ctrl-C)")] = None,
) -> None:
    """Simulate microgrid devices sending readings to the gateway."""
    from runtime.logs import configure_logging
    from simulator.run import run_simulation

    s = get_settings()
    configure_logging("simulator", s.log_level)
    try:
        stats = asyncio.run(run_simulation(s, devices=devices, rate=rate, duration=duration))
    except KeyboardInterrupt:
        return
    typer.echo(f"attempted {stats.attempted}, accepted {stats.accepted}, failed {stats.failed}")


@app.command()
def rebuild(
    model: Annotated[str, typer.Argument(help="telemetry | alerts | control | rollups")],
    compare_only: Annotated[
        bool, typer.Option(help="rebuild and compare, then drop the rebuilt tables (no swap)")
    ] = False,
    drop_old: Annotated[
        bool, typer.Option(help="drop the replaced tables after the swap (default: keep them)")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Rebuild a read model from its topic into fresh tables while the platform runs, swap them
    in atomically and print how they differ from the tables they replaced."""
    import msgspec
    from rich.console import Console

    from microgrid.rebuild import KafkaUnreachable, RebuildError, report
    from microgrid.rebuild import rebuild as run_rebuild

    console = Console(stderr=True)
    gc.set_threshold(50_000, 20, 100)  # as in the components (microgrid.components.tune_gc)
    try:
        summary = asyncio.run(
            run_rebuild(get_settings(), model, console, swap=not compare_only, drop_old=drop_old)
        )
    except (RebuildError, KafkaUnreachable) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted: the live tables are unchanged")
    data = report(summary)
    if as_json:
        sys.stdout.write(msgspec.json.encode(data).decode() + "\n")
    else:
        _print_rebuild(data)
    if compare_only and any(d["only_in_rebuilt"] or d["only_in_old"] for d in data["differences"]):
        raise typer.Exit(2)


def _print_rebuild(data: dict[str, Any]) -> None:
    typer.echo(
        f"rebuilt {data['model']} from {data['records']:,} records in {data['elapsed_s']:.1f} s"
        f" ({data['records_per_s']:,.0f} records/s); live writes paused {data['pause_s']:.2f} s"
    )
    if data["cutoff"]:
        carried = ", ".join(f"{t} {n:,}" for t, n in data["carried"].items())
        typer.echo(f"before {data['cutoff']} (beyond the log's retention) carried over: {carried}")
    if data["refused"]:
        typer.echo(f"{data['refused']:,} records or readings refused, as the live projection does")
    for d in data["differences"]:
        rows = data["rows"].get(d["table"], 0)
        if not d["only_in_rebuilt"] and not d["only_in_old"]:
            typer.echo(f"{d['table']}: {rows:,} rows, identical")
            continue
        typer.echo(
            f"{d['table']}: {rows:,} rows, {d['only_in_rebuilt']:,} only in the rebuilt table,"
            f" {d['only_in_old']:,} only in the old one"
        )
        for side, label in (("samples_rebuilt", "rebuilt"), ("samples_old", "old")):
            for row in d[side]:
                typer.echo(f"  {label}: {json.dumps(row, default=str)}")
    if data["swapped"]:
        kept = data["backup_schema"]
        typer.echo(
            "swapped in; the old tables are in schema "
            f"{kept} (drop them: DROP SCHEMA {kept} CASCADE)"
            if kept
            else "swapped in; the old tables were dropped"
        )
    else:
        typer.echo("compared only: the live tables are unchanged")


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    logging.captureWarnings(True)
    app()


if __name__ == "__main__":
    main()
