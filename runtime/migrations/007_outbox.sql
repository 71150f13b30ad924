-- Records the query API and the gateway publish, written in the transaction of the change they
-- announce; the relay publishes them in id order and deletes them once the broker acknowledged.
CREATE TABLE outbox (
    id         bigserial PRIMARY KEY,
    topic      text NOT NULL,
    key        bytea NOT NULL,
    value      bytea,  -- NULL: a tombstone
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The query API's ledger of command requests: one command per (user, Idempotency-Key), and
-- what was asked, shown as `queued` until the control read model has the command.
-- control_commands is written by the control projection alone, from control.events.
CREATE TABLE command_requests (
    id              uuid PRIMARY KEY,
    requested_by    text NOT NULL,
    idempotency_key text,
    device_id       text NOT NULL,
    command         text NOT NULL,
    params          jsonb NOT NULL DEFAULT '{}',
    ttl_s           int NOT NULL,
    deadline        timestamptz NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (requested_by, idempotency_key)
);
INSERT INTO command_requests
    (id, requested_by, idempotency_key, device_id, command, params, ttl_s, deadline, created_at)
SELECT id, requested_by, idempotency_key, device_id, command, params, ttl_s, deadline, created_at
FROM control_commands;

-- The gateway's ledger of commands handed to devices over HTTP: each is handed out once.
CREATE TABLE command_deliveries (
    command_id   uuid PRIMARY KEY,
    device_id    text NOT NULL,
    delivered_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO command_deliveries (command_id, device_id, delivered_at)
SELECT id, device_id, delivered_at FROM control_commands WHERE delivered_at IS NOT NULL;
