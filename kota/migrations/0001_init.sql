-- Core tables shared by every storage backend.

CREATE TABLE kota_meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- The device registry: who may send, and what. `metrics` maps each declared metric to its
-- canonical unit and valid range: {"pm25": {"unit": "ug/m3", "low": 0, "high": 2000}, ...}.
CREATE TABLE devices (
    device_id   text PRIMARY KEY,
    city        text NOT NULL,
    domain      text NOT NULL,
    device_type text NOT NULL,
    district    text,
    lat         double precision,
    lon         double precision,
    metrics     jsonb NOT NULL DEFAULT '{}'::jsonb,
    enabled     boolean NOT NULL DEFAULT true,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX devices_by_city ON devices (city, domain);

-- Newest value per (device, metric), upserted with every batch, so "latest" stays one index
-- lookup however long the raw history grows.
CREATE TABLE latest_values (
    device_id text NOT NULL,
    metric    text NOT NULL,
    ts        timestamptz NOT NULL,
    value     double precision NOT NULL,
    unit      text NOT NULL,
    PRIMARY KEY (device_id, metric)
);

-- Kafka offsets written in the same transaction as the data they produced: the processor
-- seeks here on start and on rebalance, which is what makes the database exactly-once.
CREATE TABLE stream_offsets (
    consumer_group text NOT NULL,
    topic          text NOT NULL,
    partition      integer NOT NULL,
    next_offset    bigint NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);
