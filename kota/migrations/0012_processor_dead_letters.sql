-- Kafka records the processor could not store (processing/processor.py): not in the wire format, a
-- time or value outside what the platform keeps, or readings the database refused after a bounded
-- number of tries. Each is written with its offset in the batch transaction that moves the partition
-- past it, so a partition never stalls on one record, and once: a replay after a crash finds it here.
-- The value is kept up to 64 KiB (value_length holds its whole length).
CREATE TABLE processor_dead_letters (
    consumer_group text NOT NULL,
    topic          text NOT NULL,
    partition      integer NOT NULL,
    "offset"       bigint NOT NULL,
    reason         text NOT NULL,
    message        text NOT NULL,
    record_key     bytea,
    record_value   bytea CHECK (octet_length(record_value) <= 65536),
    value_length   integer NOT NULL,
    dead_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition, "offset")
);
CREATE INDEX processor_dead_letters_dead_at ON processor_dead_letters (dead_at);

GRANT SELECT, INSERT ON processor_dead_letters TO kota_processor;
GRANT SELECT ON processor_dead_letters TO kota_api;
