-- TimescaleDB: raw readings as a hypertable with one-day chunks.
CREATE TABLE readings (
    ts          timestamptz NOT NULL,
    device_id   text NOT NULL,
    metric      text NOT NULL,
    value       double precision NOT NULL,
    received_at timestamptz NOT NULL,
    PRIMARY KEY (device_id, metric, ts)
);

SELECT create_hypertable('readings', by_range('ts', INTERVAL '1 day'));
