-- The operator dashboard's queries (query_api/alerts.py, devices.py, overview.py) read the few
-- alerts still open and the unread notifications out of tables that keep every one ever made.

-- Open alerts (every status but cleared), grouped by rule, site and severity and counted by
-- severity, and those a bulk acknowledgement takes (every unacknowledged alert is open): an
-- index-only scan of the open ones, in group order.
CREATE INDEX alerts_open_idx ON alerts (site_id, rule_id, severity)
    INCLUDE (device_id, status, opened_at, acknowledged_at)
    WHERE status <> 'cleared';

-- Whether a device is alerting (an active alert, acknowledged or not): a device list's page
-- and `status=alerting` join this small index instead of each device's whole alert history.
CREATE INDEX alerts_active_device_idx ON alerts (device_id)
    WHERE status IN ('active_unacknowledged', 'active_acknowledged');

-- Alerts of one rule, newest first (`GET /api/v1/alerts?rule_id=`, a group's alerts).
CREATE INDEX alerts_rule_idx ON alerts (rule_id, opened_at DESC);

-- The overview's count of unread notifications: of a site, and of a scoped user's devices.
CREATE INDEX notifications_unread_site_idx ON notifications (site_id) WHERE acked_at IS NULL;
CREATE INDEX notifications_unread_device_idx ON notifications (device_id) WHERE acked_at IS NULL;
