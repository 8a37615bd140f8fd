-- Detection, alerts, domain rules, detector checkpoints, late readings, rollups and retention.

-- Epoch milliseconds (the wire format's time) as a timestamp.
CREATE FUNCTION kota_ms(ms bigint) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT timestamptz 'epoch' + ms * interval '1 millisecond' $$;

-- Every reading a detector scored at or above the processor's threshold. Keyed by the reading and
-- the reason, so a replayed batch cannot store it twice.
CREATE TABLE anomalies (
    device_id   text NOT NULL,
    metric      text NOT NULL,
    ts          timestamptz NOT NULL,
    reason      text NOT NULL,
    value       double precision,
    score       double precision NOT NULL,
    detected_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (device_id, metric, ts, reason)
);
CREATE INDEX anomalies_by_time ON anomalies (ts);

CREATE FUNCTION kota_severity_rank(severity text) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE severity WHEN 'critical' THEN 4 WHEN 'major' THEN 3 WHEN 'minor' THEN 2 WHEN 'warning' THEN 1
                         ELSE 0 END
$$;

-- Alerts as operators expect them: one open alert per (device, type); a repeat updates it (count,
-- last value, last time, severity only upwards); lifecycle active -> acknowledged -> cleared, each
-- step with who and when in alert_events.
CREATE TABLE alerts (
    alert_id        bigserial PRIMARY KEY,
    device_id       text NOT NULL,
    city            text NOT NULL,
    domain          text NOT NULL,
    alert_type      text NOT NULL,
    metric          text NOT NULL,
    severity        text NOT NULL CHECK (kota_severity_rank(severity) > 0),
    state           text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'acknowledged', 'cleared')),
    message         text NOT NULL,
    count           bigint NOT NULL DEFAULT 1,
    first_ts        timestamptz NOT NULL,
    last_ts         timestamptz NOT NULL,
    last_value      double precision,
    details         jsonb NOT NULL DEFAULT '{}'::jsonb,
    clear_after_s   double precision NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    acknowledged_at timestamptz,
    acknowledged_by text,
    cleared_at      timestamptz,
    cleared_by      text
);
CREATE UNIQUE INDEX alerts_one_open_per_device_and_type ON alerts (device_id, alert_type) WHERE state <> 'cleared';
CREATE INDEX alerts_by_city ON alerts (city, state, created_at DESC);

CREATE TABLE alert_events (
    event_id bigserial PRIMARY KEY,
    alert_id bigint NOT NULL REFERENCES alerts ON DELETE CASCADE,
    at       timestamptz NOT NULL DEFAULT now(),
    action   text NOT NULL CHECK (action IN ('raised', 'escalated', 'acknowledged', 'cleared')),
    actor    text NOT NULL,
    severity text NOT NULL,
    comment  text
);
CREATE INDEX alert_events_by_alert ON alert_events (alert_id, event_id);

-- Air quality per station (ISPU over the configured averaging window), newest evaluation.
CREATE TABLE station_ispu (
    device_id      text PRIMARY KEY,
    ts             timestamptz NOT NULL,
    ispu           double precision NOT NULL,  -- 'Infinity' means "> 500"
    category       text NOT NULL,
    critical       text NOT NULL,
    sub_indices    jsonb NOT NULL,
    window_minutes integer NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Flood gates: per-gate thresholds (cm; a gate without a row uses the processor's defaults) and
-- current status. Siaga 4 is normal, Siaga 1 the most severe.
CREATE TABLE flood_gates (
    device_id     text PRIMARY KEY,
    siaga3_cm     double precision NOT NULL,
    siaga2_cm     double precision NOT NULL,
    siaga1_cm     double precision NOT NULL,
    rise_cm_per_h double precision NOT NULL,
    CHECK (siaga3_cm < siaga2_cm AND siaga2_cm < siaga1_cm AND rise_cm_per_h > 0)
);
CREATE TABLE gate_status (
    device_id     text PRIMARY KEY,
    ts            timestamptz NOT NULL,
    level_cm      double precision NOT NULL,
    siaga         smallint NOT NULL CHECK (siaga BETWEEN 1 AND 4),
    rise_cm_per_h double precision,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Detector state per partition with the offset it reflects. Written in the same transaction as
-- the data, so a restart restores it and replays detection (not writes) from that offset.
CREATE TABLE detector_checkpoints (
    consumer_group text NOT NULL,
    topic          text NOT NULL,
    partition      integer NOT NULL,
    next_offset    bigint NOT NULL,
    series         jsonb NOT NULL,
    state          bytea NOT NULL,
    saved_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);

-- Readings that reached the processor later than the allowed lateness: kept here (counted, with
-- the reason) instead of being merged into closed windows.
CREATE TABLE late_readings (
    device_id   text NOT NULL,
    metric      text NOT NULL,
    ts          timestamptz NOT NULL,
    value       double precision NOT NULL,
    received_at timestamptz NOT NULL,
    reason      text NOT NULL,
    PRIMARY KEY (device_id, metric, ts)
);

-- How long each table keeps data, and when TimescaleDB compresses it. The plain-PostgreSQL path
-- applies the same numbers by dropping partitions and deleting old rollup rows.
CREATE TABLE retention_settings (
    table_name          text PRIMARY KEY,
    keep_days           integer,  -- NULL: keep forever
    compress_after_days integer
);
INSERT INTO retention_settings VALUES
    ('readings', 90, 7), ('agg_1m', 400, 30), ('agg_1h', 1830, NULL), ('agg_1d', NULL, NULL),
    ('anomalies', 400, NULL), ('late_readings', 30, NULL);
