"""Topic names, record header names and consumer group ids. Defined here and nowhere else."""

from typing import Final, Literal


class Topics:
    TELEMETRY_RAW: Final = "telemetry.raw"
    TELEMETRY_VALID: Final = "telemetry.valid"
    TELEMETRY_DLQ: Final = "telemetry.dlq"  # refused by the validator or telemetry projection
    ALERT_RULES: Final = "alert-rules"  # compacted, keyed by rule id; a tombstone deletes
    ALERTS: Final = "alerts"  # alert events and acknowledgements, keyed by device id
    ALERTS_DLQ: Final = "alerts.dlq"  # refused by the alerter or the alerts projection
    ALERTER_STATE: Final = "alerter.state"  # compacted changelog of per-device alert state
    CONTROL_COMMANDS: Final = "control.commands"  # requested commands, keyed by device id
    # commands for devices to execute, of sites without topics of their own (site_topic)
    CONTROL_DISPATCH: Final = "control.dispatch"
    CONTROL_RESULTS: Final = "control.results"  # devices' replies (from sites' topics: checked)
    CONTROL_EVENTS: Final = "control.events"  # every lifecycle transition
    CONTROLLER_STATE: Final = "controller.state"  # compacted changelog, keyed by command id
    CONTROL_DLQ: Final = "control.dlq"  # refused by the controller or the control projection


# A site whose devices have Kafka clients has topics of its own (`microgrid keys create --kafka`):
# its devices produce readings and replies there and consume their commands there, and the
# broker's ACLs give a site's principals these three topics and nothing else. Topic names take
# only [A-Za-z0-9._-], and a '.' in a site id would make one site's names a prefix of
# another's, so such a site's id is letters, digits, '_' and '-'.
SITE_ID_PATTERN: Final = "[A-Za-z0-9][A-Za-z0-9_-]{0,63}"
SiteTopic = Literal["telemetry", "dispatch", "results"]
SITE_TOPICS: Final[tuple[SiteTopic, ...]] = ("telemetry", "dispatch", "results")


def site_topic(site_id: str, kind: SiteTopic) -> str:
    """`site.<site>.telemetry` (readings, keyed by device), `.dispatch` (commands for the
    site's devices) or `.results` (their replies), without the namespace."""
    return f"site.{site_id}.{kind}"


def site_group_prefix(site_id: str) -> str:
    """The consumer groups a site's principals may use start with this."""
    return f"site.{site_id}."


class Headers:
    # On every dead-letter topic: why, which stage refused it, and where the record came from.
    DLQ_REASON: Final = "x-dlq-reason"
    DLQ_STAGE: Final = "x-dlq-stage"  # the consumer group that refused it
    DLQ_SOURCE_TOPIC: Final = "x-dlq-source-topic"
    DLQ_SOURCE_PARTITION: Final = "x-dlq-source-partition"
    DLQ_SOURCE_OFFSET: Final = "x-dlq-source-offset"
    # On a record `microgrid dlq redrive` sent back to its source topic: how often it has been
    # redriven, and the dead letter it was sent from (TOPIC:PARTITION:OFFSET). Stages copy the
    # count onto the dead letter of a redriven record (and the validator onto telemetry.valid),
    # so a record still refused is not redriven again and again.
    REDRIVE_COUNT: Final = "x-redrive-count"
    REDRIVEN_FROM: Final = "x-redriven-from"
    # On telemetry.valid: the telemetry.raw record it was derived from (projection de-duplication).
    SOURCE_TOPIC: Final = "x-source-topic"  # only when it is a site's topic, not telemetry.raw
    SOURCE_PARTITION: Final = "x-source-partition"
    SOURCE_OFFSET: Final = "x-source-offset"


class Groups:
    VALIDATOR: Final = "microgrid.validator"
    TELEMETRY_PROJECTOR: Final = "microgrid.projector.telemetry"
    ALERTER: Final = "microgrid.alerter"
    ALERTS_PROJECTOR: Final = "microgrid.projector.alerts"
    CONTROLLER: Final = "microgrid.controller"
    CONTROL_PROJECTOR: Final = "microgrid.projector.control"
    SIMULATOR: Final = "microgrid.simulator"


class Streams:
    """Redis streams that feed the live SSE endpoint (namespaced like topics)."""

    # alert.*, notification.* and control.updated: trimmed by time (EVENT_RETENTION_S), so
    # telemetry volume never pushes them out; SSE ids are its entry ids
    EVENTS: Final = "microgrid:events"
    # device.latest: capped by count (LATEST_STREAM_MAXLEN), lossy by design
    LATEST: Final = "microgrid:latest"


class Events:
    """SSE event names."""

    ALERT_OPENED: Final = "alert.opened"
    ALERT_CLEARED: Final = "alert.cleared"
    ALERT_ACKNOWLEDGED: Final = "alert.acknowledged"
    NOTIFICATION_CREATED: Final = "notification.created"
    NOTIFICATION_ACKED: Final = "notification.acked"
    CONTROL_UPDATED: Final = "control.updated"
    DEVICE_LATEST: Final = "device.latest"
    # sent by the API itself when the client's token expires; the stream then ends
    SESSION_EXPIRED: Final = "session.expired"
