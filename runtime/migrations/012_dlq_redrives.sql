-- Dead letters `microgrid dlq redrive` sent back to their source topics, one row per letter
-- (its dead-letter topic, partition, offset and record timestamp, namespaced topic names as on
-- the broker: a topic made again starts at offset 0, and its letters are new ones), so
-- redriving the same selection again sends nothing. A row is inserted in the transaction that
-- commits only once the broker acknowledged the record sent: a redrive that fails before that
-- leaves no row, and the letter stays redrivable.
CREATE TABLE dlq_redrives (
    dlq_topic           text NOT NULL,
    dlq_partition       integer NOT NULL,
    dlq_offset          bigint NOT NULL,
    letter_timestamp_ms bigint NOT NULL,  -- the letter's record timestamp
    target_topic        text NOT NULL,
    redrive_count       integer NOT NULL,  -- the x-redrive-count the record was sent with
    redriven_at         timestamptz NOT NULL DEFAULT now(),
    redriven_by         text NOT NULL,
    PRIMARY KEY (dlq_topic, dlq_partition, dlq_offset, letter_timestamp_ms)
);
