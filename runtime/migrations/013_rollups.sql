-- Rollups of telemetry_readings: per device, per 1-minute and per 1-hour bucket, the readings'
-- count and, per metric, how many readings had it, their sum, min and max (avg = sum / count).
-- The telemetry projection maintains both in the transaction that inserts the readings, from
-- exactly the readings it inserted (projections/telemetry_store.py), so a repeated identity
-- never counts twice and a late reading updates its buckets. Buckets are aligned to UTC.
CREATE TABLE telemetry_rollup_1m (
    device_id           text NOT NULL,
    bucket              timestamptz NOT NULL,
    count               bigint NOT NULL,
    voltage_v_count     bigint NOT NULL,
    voltage_v_sum       double precision,
    voltage_v_min       double precision,
    voltage_v_max       double precision,
    current_a_count     bigint NOT NULL,
    current_a_sum       double precision,
    current_a_min       double precision,
    current_a_max       double precision,
    frequency_hz_count  bigint NOT NULL,
    frequency_hz_sum    double precision,
    frequency_hz_min    double precision,
    frequency_hz_max    double precision,
    power_kw_count      bigint NOT NULL,
    power_kw_sum        double precision,
    power_kw_min        double precision,
    power_kw_max        double precision,
    soc_pct_count       bigint NOT NULL,
    soc_pct_sum         double precision,
    soc_pct_min         double precision,
    soc_pct_max         double precision,
    temperature_c_count bigint NOT NULL,
    temperature_c_sum   double precision,
    temperature_c_min   double precision,
    temperature_c_max   double precision,
    PRIMARY KEY (device_id, bucket)
) PARTITION BY RANGE (bucket);

-- Rollup rows are updated by every poll that has readings of their bucket: room left on their
-- pages keeps those updates HOT (no new index entries), which halved the rollups' cost of a
-- poll of 5,000 devices' readings (benchmarks/history.py).
-- Not partitioned: a device has 24 rows a day. Expired rows are deleted by bucket (the index).
CREATE TABLE telemetry_rollup_1h (LIKE telemetry_rollup_1m INCLUDING ALL) WITH (fillfactor = 70);
CREATE INDEX telemetry_rollup_1h_bucket_idx ON telemetry_rollup_1h (bucket);

-- The day's partitions of telemetry_readings and telemetry_rollup_1m, made in the schema each
-- parent resolves to through the search_path (a rebuild runs the projection's code in a
-- scratch schema of its own).
CREATE OR REPLACE FUNCTION ensure_telemetry_partition(day date) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    parent text;
    schema name;
    part text := to_char(day, 'YYYYMMDD');
BEGIN
    FOREACH parent IN ARRAY ARRAY['telemetry_readings', 'telemetry_rollup_1m'] LOOP
        SELECT n.nspname INTO schema
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = to_regclass(parent);
        IF schema IS NULL THEN
            RAISE EXCEPTION 'ensure_telemetry_partition: no table % on the search_path', parent;
        END IF;
        PERFORM pg_advisory_xact_lock(hashtext(format('%I.%I partitions', schema, parent)));
        IF to_regclass(format('%I.%I', schema, parent || '_' || part)) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I.%I PARTITION OF %I.%I FOR VALUES FROM (%L) TO (%L)%s',
                schema, parent || '_' || part, schema, parent,
                day::timestamp AT TIME ZONE 'UTC', (day + 1)::timestamp AT TIME ZONE 'UTC',
                CASE parent WHEN 'telemetry_rollup_1m' THEN ' WITH (fillfactor = 70)' ELSE '' END
            );
        END IF;
    END LOOP;
END;
$$;

-- Retention: drops the day partitions of telemetry_readings (older than raw_days) and of
-- telemetry_rollup_1m (older than m1_days) whose whole day is past, and deletes the rows of
-- telemetry_rollup_1h whose hour is older than h1_days. Returns each partition dropped (rows
-- NULL) and, if any were deleted, telemetry_rollup_1h with the number of rows.
CREATE FUNCTION drop_expired_telemetry(raw_days integer, m1_days integer, h1_days integer)
RETURNS TABLE (relation text, rows bigint)
LANGUAGE plpgsql AS $$
DECLARE
    parent text;
    keep integer;
    schema name;
    expired record;
    deleted bigint;
BEGIN
    FOREACH parent IN ARRAY ARRAY['telemetry_readings', 'telemetry_rollup_1m'] LOOP
        keep := CASE parent WHEN 'telemetry_readings' THEN raw_days ELSE m1_days END;
        SELECT n.nspname INTO schema
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = to_regclass(parent);
        CONTINUE WHEN schema IS NULL;
        CONTINUE WHEN NOT EXISTS (
            SELECT FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = format('%I.%I', schema, parent)::regclass
              AND c.relname ~ ('^' || parent || '_[0-9]{8}$')
              AND (to_date(right(c.relname, 8), 'YYYYMMDD') + 1)::timestamp AT TIME ZONE 'UTC'
                  <= now() - make_interval(days => keep)
        );
        -- The parent first, then the lock ensure_telemetry_partition takes (no partition is
        -- made while these go): a projector holds the parent while it waits for that lock,
        -- so the other order could deadlock with it.
        EXECUTE format('LOCK TABLE %I.%I IN ACCESS EXCLUSIVE MODE', schema, parent);
        PERFORM pg_advisory_xact_lock(hashtext(format('%I.%I partitions', schema, parent)));
        FOR expired IN
            SELECT c.relname
            FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
            WHERE i.inhparent = format('%I.%I', schema, parent)::regclass
              AND c.relname ~ ('^' || parent || '_[0-9]{8}$')
              AND (to_date(right(c.relname, 8), 'YYYYMMDD') + 1)::timestamp AT TIME ZONE 'UTC'
                  <= now() - make_interval(days => keep)
            ORDER BY c.relname
        LOOP
            EXECUTE format('DROP TABLE %I.%I', schema, expired.relname);
            relation := format('%I.%I', schema, expired.relname);
            rows := NULL;
            RETURN NEXT;
        END LOOP;
    END LOOP;
    IF to_regclass('telemetry_rollup_1h') IS NOT NULL THEN
        DELETE FROM telemetry_rollup_1h
        WHERE bucket <= now() - make_interval(days => h1_days) - interval '1 hour';
        GET DIAGNOSTICS deleted = ROW_COUNT;
        IF deleted > 0 THEN
            relation := 'telemetry_rollup_1h';
            rows := deleted;
            RETURN NEXT;
        END IF;
    END IF;
END;
$$;

-- Backfill from the readings stored so far.
SELECT ensure_telemetry_partition(to_date(right(c.relname, 8), 'YYYYMMDD'))
FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = 'telemetry_readings'::regclass
  AND c.relname ~ '^telemetry_readings_[0-9]{8}$';

INSERT INTO telemetry_rollup_1m
SELECT device_id, date_bin('1 minute', ts, timestamptz 'epoch'), count(*),
       count(voltage_v), sum(voltage_v), min(voltage_v), max(voltage_v),
       count(current_a), sum(current_a), min(current_a), max(current_a),
       count(frequency_hz), sum(frequency_hz), min(frequency_hz), max(frequency_hz),
       count(power_kw), sum(power_kw), min(power_kw), max(power_kw),
       count(soc_pct), sum(soc_pct), min(soc_pct), max(soc_pct),
       count(temperature_c), sum(temperature_c), min(temperature_c), max(temperature_c)
FROM telemetry_readings
GROUP BY 1, 2;

INSERT INTO telemetry_rollup_1h
SELECT device_id, date_bin('1 hour', bucket, timestamptz 'epoch'), sum(count),
       sum(voltage_v_count), sum(voltage_v_sum), min(voltage_v_min), max(voltage_v_max),
       sum(current_a_count), sum(current_a_sum), min(current_a_min), max(current_a_max),
       sum(frequency_hz_count), sum(frequency_hz_sum), min(frequency_hz_min), max(frequency_hz_max),
       sum(power_kw_count), sum(power_kw_sum), min(power_kw_min), max(power_kw_max),
       sum(soc_pct_count), sum(soc_pct_sum), min(soc_pct_min), max(soc_pct_max),
       sum(temperature_c_count), sum(temperature_c_sum), min(temperature_c_min),
       max(temperature_c_max)
FROM telemetry_rollup_1m
GROUP BY 1, 2;
