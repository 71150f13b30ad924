-- The projections recognise re-emitted records by their content's identity, not by source
-- offsets: a poll the validator publishes again after part of its output failed can land after
-- records that followed it upstream, and a watermark then dropped readings never stored.
ALTER TABLE projection_offsets DROP COLUMN IF EXISTS source_watermarks;
