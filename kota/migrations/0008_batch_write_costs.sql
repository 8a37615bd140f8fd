-- What the processor's batch transaction waited on or paid for needlessly.

-- kota_ms was declared IMMUTABLE, but timestamptz + interval is STABLE: PostgreSQL does not inline a
-- SQL function whose body is more volatile than its declaration, so every row paid a function call
-- through the executor (320,000 calls in a bench.processing run, seen in pg_stat_statements).
-- Declared STABLE, it is inlined into the statements that use it.
ALTER FUNCTION kota_ms(bigint) STABLE;
