-- Plain PostgreSQL: hourly and daily rollups are tables kept by the processor's rollup job
-- (processing/maintenance.py) from agg_1m; rollup_dirty names the hours that changed.
CREATE TABLE agg_1h (LIKE agg_1m INCLUDING ALL);
CREATE TABLE agg_1d (LIKE agg_1m INCLUDING ALL);
CREATE TABLE rollup_dirty (
    hour timestamptz PRIMARY KEY
);
CREATE INDEX agg_1m_by_bucket ON agg_1m (bucket);
CREATE INDEX agg_1h_by_bucket ON agg_1h (bucket);
