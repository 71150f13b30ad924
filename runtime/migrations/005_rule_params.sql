-- A rule's kind-specific parameters in one jsonb column, checked by the API against the kind's
-- type (contracts.alerting): a new kind of rule needs no schema change.
ALTER TABLE alert_rules ADD COLUMN params jsonb NOT NULL DEFAULT '{}';
UPDATE alert_rules SET params = jsonb_strip_nulls(jsonb_build_object(
    'metric', metric, 'op', op, 'threshold', threshold, 'low', low, 'high', high,
    'clear_threshold', clear_threshold, 'for_s', for_s, 'window_s', window_s,
    'silent_s', silent_s));
ALTER TABLE alert_rules
    DROP CONSTRAINT alert_rules_kind_check,
    DROP COLUMN metric,
    DROP COLUMN op,
    DROP COLUMN threshold,
    DROP COLUMN low,
    DROP COLUMN high,
    DROP COLUMN clear_threshold,
    DROP COLUMN for_s,
    DROP COLUMN window_s,
    DROP COLUMN silent_s;
