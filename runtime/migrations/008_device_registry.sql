-- Which site each device belongs to: the authority that the gateway, the validator and the query
-- API check ownership against (the `devices` read model only mirrors what readings said).
-- Written by the gateway and the validator when a device's first reading registers it
-- (DEVICE_REGISTRATION=first-reading), and by admins (`microgrid devices`, admin routes).
CREATE TABLE device_registry (
    device_id     text PRIMARY KEY,
    site_id       text NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now(),
    registered_by text NOT NULL
);
CREATE INDEX device_registry_site_idx ON device_registry (site_id, device_id);

-- Every change of a device's site, by whom and why.
CREATE TABLE device_moves (
    id        bigserial PRIMARY KEY,
    device_id text NOT NULL,
    from_site text NOT NULL,
    to_site   text NOT NULL,
    moved_by  text NOT NULL,
    reason    text NOT NULL DEFAULT '',
    moved_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX device_moves_device_idx ON device_moves (device_id, moved_at DESC);

-- Devices that reported before the registry existed belong to the site they reported for.
INSERT INTO device_registry (device_id, site_id, registered_at, registered_by)
SELECT device_id, site_id, first_seen, 'migration' FROM devices
ON CONFLICT (device_id) DO NOTHING;

-- Processes that cache owners listen on this channel: a changed or removed entry is dropped
-- from their caches when its transaction commits, whoever made the change.
CREATE FUNCTION device_registry_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('device_registry', OLD.device_id);
    RETURN NULL;
END;
$$;
CREATE TRIGGER device_registry_changed AFTER UPDATE OR DELETE ON device_registry
FOR EACH ROW EXECUTE FUNCTION device_registry_changed();

-- Users of the query API scoped to sites; NULL: every site (admins always see every site).
ALTER TABLE users ADD COLUMN sites text[];
