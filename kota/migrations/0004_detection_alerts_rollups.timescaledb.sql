-- TimescaleDB: agg_1m is a hypertable; hourly and daily rollups are continuous aggregates
-- (daily on top of hourly), refreshed by policies; compression and retention are policies with
-- the numbers in retention_settings.
SELECT create_hypertable('agg_1m', by_range('bucket', INTERVAL '7 days'), migrate_data => true);

CREATE MATERIALIZED VIEW agg_1h WITH (timescaledb.continuous) AS
SELECT device_id, metric, time_bucket(INTERVAL '1 hour', ts) AS bucket,
       count(*) AS n, sum(value) AS sum, sum(value * value) AS sum_sq, min(value) AS min, max(value) AS max,
       min(ts) AS first_ts, first(value, ts) AS first_value, max(ts) AS last_ts, last(value, ts) AS last_value
FROM readings
GROUP BY device_id, metric, time_bucket(INTERVAL '1 hour', ts)
WITH NO DATA;

CREATE MATERIALIZED VIEW agg_1d WITH (timescaledb.continuous) AS
SELECT device_id, metric, time_bucket(INTERVAL '1 day', bucket) AS bucket,
       sum(n)::bigint AS n, sum(sum) AS sum, sum(sum_sq) AS sum_sq, min(min) AS min, max(max) AS max,
       min(first_ts) AS first_ts, first(first_value, first_ts) AS first_value,
       max(last_ts) AS last_ts, last(last_value, last_ts) AS last_value
FROM agg_1h
GROUP BY device_id, metric, time_bucket(INTERVAL '1 day', bucket)
WITH NO DATA;

ALTER MATERIALIZED VIEW agg_1h SET (timescaledb.materialized_only = false);
ALTER MATERIALIZED VIEW agg_1d SET (timescaledb.materialized_only = false);

SELECT add_continuous_aggregate_policy('agg_1h', start_offset => INTERVAL '8 days',
                                       end_offset => INTERVAL '1 minute', schedule_interval => INTERVAL '1 minute');
SELECT add_continuous_aggregate_policy('agg_1d', start_offset => INTERVAL '9 days',
                                       end_offset => INTERVAL '1 hour', schedule_interval => INTERVAL '10 minutes');

ALTER TABLE readings SET (timescaledb.compress, timescaledb.compress_segmentby = 'device_id, metric',
                          timescaledb.compress_orderby = 'ts');
ALTER TABLE agg_1m SET (timescaledb.compress, timescaledb.compress_segmentby = 'device_id, metric',
                        timescaledb.compress_orderby = 'bucket');

DO $$
DECLARE
    setting record;
BEGIN
    FOR setting IN SELECT * FROM retention_settings WHERE table_name IN ('readings', 'agg_1m', 'agg_1h') LOOP
        IF setting.compress_after_days IS NOT NULL THEN
            PERFORM add_compression_policy(setting.table_name::regclass,
                                           make_interval(days => setting.compress_after_days));
        END IF;
        IF setting.keep_days IS NOT NULL THEN
            PERFORM add_retention_policy(setting.table_name::regclass, make_interval(days => setting.keep_days));
        END IF;
    END LOOP;
END
$$;
