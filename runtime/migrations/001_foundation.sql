-- Device ingest keys: only a SHA-256 of each key is stored (keys are 256-bit random tokens).
CREATE TABLE device_keys (
    id          bigserial PRIMARY KEY,
    key_prefix  text NOT NULL,
    key_hash    bytea NOT NULL UNIQUE,
    site_id     text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE TABLE devices (
    device_id   text PRIMARY KEY,
    site_id     text NOT NULL,
    device_type text NOT NULL,
    first_seen  timestamptz NOT NULL,
    last_seen   timestamptz NOT NULL
);
CREATE INDEX devices_site_idx ON devices (site_id);

-- Time-partitioned by day; partitions are made by ensure_telemetry_partition().
CREATE TABLE telemetry_readings (
    device_id     text NOT NULL,
    ts            timestamptz NOT NULL,
    seq           bigint,
    voltage_v     double precision,
    current_a     double precision,
    frequency_hz  double precision,
    power_kw      double precision,
    soc_pct       double precision,
    temperature_c double precision,
    ingested_at   timestamptz NOT NULL DEFAULT now()
) PARTITION BY RANGE (ts);
CREATE INDEX telemetry_readings_device_ts_idx ON telemetry_readings (device_id, ts);

CREATE FUNCTION ensure_telemetry_partition(day date) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    part text := format('telemetry_readings_%s', to_char(day, 'YYYYMMDD'));
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext('telemetry_readings_partitions'));
    IF to_regclass(part) IS NULL THEN
        EXECUTE format(
            'CREATE TABLE %I PARTITION OF telemetry_readings FOR VALUES FROM (%L) TO (%L)',
            part, day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC'
        );
    END IF;
END;
$$;

CREATE TABLE device_latest (
    device_id     text PRIMARY KEY,
    site_id       text NOT NULL,
    device_type   text NOT NULL,
    ts            timestamptz NOT NULL,
    seq           bigint,
    voltage_v     double precision,
    current_a     double precision,
    frequency_hz  double precision,
    power_kw      double precision,
    soc_pct       double precision,
    temperature_c double precision,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Consumer positions of projections, written in the same transaction as the rows they produced.
-- source_watermarks: per source partition, the highest source offset already projected.
CREATE TABLE projection_offsets (
    projection        text NOT NULL,
    topic             text NOT NULL,
    partition         int NOT NULL,
    next_offset       bigint NOT NULL,
    source_watermarks jsonb NOT NULL DEFAULT '{}',
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, topic, partition)
);
