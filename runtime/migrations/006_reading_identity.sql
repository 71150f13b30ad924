-- A reading is identified by (device_id, ts): stored once, the first write wins. Rows that
-- repeat an identity (from before this rule) keep the one ingested first.
DELETE FROM telemetry_readings r
USING telemetry_readings first
WHERE r.device_id = first.device_id AND r.ts = first.ts
  AND (r.ingested_at, r.ctid) > (first.ingested_at, first.ctid);
DROP INDEX telemetry_readings_device_ts_idx;
CREATE UNIQUE INDEX telemetry_readings_identity ON telemetry_readings (device_id, ts);
