-- Hourly and daily rollups are merged by each batch from its readings' partials, as agg_1m is
-- (processing/store.py), instead of recomputed by a job from agg_1m for the hours the batches marked
-- in rollup_dirty. The job read every minute of a changed hour each minute (2.5-4 s a minute on the
-- bench database) and, while it held the marks it had taken, every batch marking that hour waited
-- for it. Hours still marked are rolled up here, one last time, before the marks go.
INSERT INTO agg_1h (device_id, metric, bucket, n, sum, sum_sq, min, max, first_ts, first_value, last_ts, last_value)
SELECT a.device_id, a.metric, w.start, sum(n), sum(sum), sum(sum_sq), min(min), max(max),
       min(first_ts), (array_agg(first_value ORDER BY first_ts))[1],
       max(last_ts), (array_agg(last_value ORDER BY last_ts DESC))[1]
FROM (SELECT DISTINCT hour AS start FROM rollup_dirty) AS w
JOIN agg_1m a ON a.bucket >= w.start AND a.bucket < w.start + interval '1 hour'
GROUP BY a.device_id, a.metric, w.start
ON CONFLICT (device_id, metric, bucket) DO UPDATE SET n = EXCLUDED.n, sum = EXCLUDED.sum,
    sum_sq = EXCLUDED.sum_sq, min = EXCLUDED.min, max = EXCLUDED.max, first_ts = EXCLUDED.first_ts,
    first_value = EXCLUDED.first_value, last_ts = EXCLUDED.last_ts, last_value = EXCLUDED.last_value;

INSERT INTO agg_1d (device_id, metric, bucket, n, sum, sum_sq, min, max, first_ts, first_value, last_ts, last_value)
SELECT a.device_id, a.metric, w.start, sum(n), sum(sum), sum(sum_sq), min(min), max(max),
       min(first_ts), (array_agg(first_value ORDER BY first_ts))[1],
       max(last_ts), (array_agg(last_value ORDER BY last_ts DESC))[1]
FROM (SELECT DISTINCT date_bin('1 day', hour, timestamptz 'epoch') AS start FROM rollup_dirty) AS w
JOIN agg_1h a ON a.bucket >= w.start AND a.bucket < w.start + interval '1 day'
GROUP BY a.device_id, a.metric, w.start
ON CONFLICT (device_id, metric, bucket) DO UPDATE SET n = EXCLUDED.n, sum = EXCLUDED.sum,
    sum_sq = EXCLUDED.sum_sq, min = EXCLUDED.min, max = EXCLUDED.max, first_ts = EXCLUDED.first_ts,
    first_value = EXCLUDED.first_value, last_ts = EXCLUDED.last_ts, last_value = EXCLUDED.last_value;

DROP TABLE rollup_dirty;
