-- One-minute tumbling windows per (device, metric) on event time, kept as mergeable partials:
-- combining two partials equals aggregating the union of their readings. The processor upserts
-- them in the same transaction as the raw readings, from the readings that transaction newly
-- stored, so they stay exact through replays, duplicates and late readings.
CREATE TABLE agg_1m (
    device_id   text NOT NULL,
    metric      text NOT NULL,
    bucket      timestamptz NOT NULL,
    n           bigint NOT NULL,
    sum         double precision NOT NULL,
    sum_sq      double precision NOT NULL,
    min         double precision NOT NULL,
    max         double precision NOT NULL,
    first_ts    timestamptz NOT NULL,
    first_value double precision NOT NULL,
    last_ts     timestamptz NOT NULL,
    last_value  double precision NOT NULL,
    PRIMARY KEY (device_id, metric, bucket)
);
