-- When a device fetched a command over HTTP (long poll); each command is handed out once.
ALTER TABLE control_commands ADD COLUMN delivered_at timestamptz;
CREATE INDEX control_commands_undelivered_idx ON control_commands (device_id, created_at)
    WHERE status = 'processing' AND delivered_at IS NULL;
