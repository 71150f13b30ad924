-- The default microgrid rule set (nominal 230 V / 50 Hz). Admins change or delete them through
-- the API; the API publishes stored rules to the alerters when it starts.
INSERT INTO alert_rules
    (id, name, kind, metric, op, threshold, low, high, clear_threshold, for_s, silent_s,
     severity, scope)
VALUES
    ('00000000-0000-4000-8000-000000000001', 'Battery state of charge low', 'threshold',
     'soc_pct', 'lt', 15, NULL, NULL, 20, 30, NULL, 'major', '{"device_type": "battery"}'),
    ('00000000-0000-4000-8000-000000000002', 'Over-temperature', 'threshold',
     'temperature_c', 'gt', 75, NULL, NULL, 70, 10, NULL, 'critical', '{}'),
    ('00000000-0000-4000-8000-000000000003', 'Frequency deviation from 50 Hz', 'threshold',
     'frequency_hz', 'outside', NULL, 49.5, 50.5, NULL, 5, NULL, 'major', '{}'),
    ('00000000-0000-4000-8000-000000000004', 'Voltage outside 230 V +-10%', 'threshold',
     'voltage_v', 'outside', NULL, 207, 253, NULL, 5, NULL, 'major', '{}'),
    ('00000000-0000-4000-8000-000000000005', 'Device offline', 'offline',
     NULL, NULL, NULL, NULL, NULL, NULL, NULL, 120, 'warning', '{}')
ON CONFLICT (id) DO NOTHING;
