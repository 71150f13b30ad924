-- Operators, analysts and admins of the query API. Passwords are argon2 hashes.
CREATE TABLE users (
    username      text PRIMARY KEY,
    role          text NOT NULL CHECK (role IN ('admin', 'operator', 'viewer')),
    password_hash text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE alert_rules (
    id              uuid PRIMARY KEY,
    name            text NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('threshold', 'rate_of_change', 'offline')),
    metric          text,
    op              text CHECK (op IN ('gt', 'lt', 'outside')),
    threshold       double precision,
    low             double precision,
    high            double precision,
    clear_threshold double precision,
    for_s           double precision,
    window_s        double precision,
    silent_s        double precision,
    severity        text NOT NULL CHECK (severity IN ('critical', 'major', 'minor', 'warning')),
    scope           jsonb NOT NULL DEFAULT '{}',
    enabled         boolean NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- status: active_unacknowledged -> active_acknowledged -> cleared, or cleared_unacknowledged.
CREATE TABLE alerts (
    id              text PRIMARY KEY,
    rule_id         uuid NOT NULL,
    device_id       text NOT NULL,
    site_id         text NOT NULL,
    severity        text NOT NULL,
    status          text NOT NULL,
    message         text NOT NULL DEFAULT '',
    value           double precision,
    opened_at       timestamptz NOT NULL,
    cleared_at      timestamptz,
    acknowledged_at timestamptz,
    acknowledged_by text
);
CREATE INDEX alerts_opened_idx ON alerts (opened_at DESC, id DESC);
CREATE INDEX alerts_device_idx ON alerts (device_id, opened_at DESC);
CREATE INDEX alerts_site_idx ON alerts (site_id, opened_at DESC);

CREATE TABLE notifications (
    id         text PRIMARY KEY,
    alert_id   text,
    device_id  text NOT NULL,
    site_id    text NOT NULL,
    kind       text NOT NULL,
    severity   text NOT NULL,
    title      text NOT NULL,
    created_at timestamptz NOT NULL,
    acked_at   timestamptz,
    acked_by   text
);
CREATE INDEX notifications_created_idx ON notifications (created_at DESC, id DESC);

CREATE TABLE control_commands (
    id              uuid PRIMARY KEY,
    device_id       text NOT NULL,
    command         text NOT NULL,
    params          jsonb NOT NULL DEFAULT '{}',
    status          text NOT NULL CHECK (status IN ('queued', 'processing', 'succeeded', 'failed')),
    reason          text,
    ttl_s           int NOT NULL,
    deadline        timestamptz NOT NULL,
    requested_by    text NOT NULL,
    idempotency_key text,
    history         jsonb NOT NULL DEFAULT '[]',
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (requested_by, idempotency_key)
);
CREATE INDEX control_commands_created_idx ON control_commands (created_at DESC, id DESC);
CREATE INDEX control_commands_device_idx ON control_commands (device_id, created_at DESC);
