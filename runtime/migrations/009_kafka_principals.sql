-- The Kafka principals of sites whose devices have Kafka clients (`microgrid keys create
-- --kafka`): the broker holds their SCRAM credentials and ACLs, this table who they are for.
-- A site with a row here has topics of its own (site.<site>.telemetry, .dispatch, .results),
-- so the query API sends its devices' commands there; revoking a principal keeps its topics.
CREATE TABLE kafka_principals (
    id         bigserial PRIMARY KEY,
    username   text NOT NULL UNIQUE,
    site_id    text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
CREATE INDEX kafka_principals_site_idx ON kafka_principals (site_id);
