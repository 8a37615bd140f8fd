-- Plain PostgreSQL: raw readings in native range partitions by day. The project creates
-- partitions ahead (kota.schema.ensure_partitions); the default partition catches anything
-- outside them so that a reading is never refused by the database.
CREATE TABLE readings (
    ts          timestamptz NOT NULL,
    device_id   text NOT NULL,
    metric      text NOT NULL,
    value       double precision NOT NULL,
    received_at timestamptz NOT NULL,
    PRIMARY KEY (device_id, metric, ts)
) PARTITION BY RANGE (ts);

CREATE TABLE readings_default PARTITION OF readings DEFAULT;
