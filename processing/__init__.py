"""Processing: Kafka → micro-batches → TimescaleDB/PostgreSQL, exactly once."""
