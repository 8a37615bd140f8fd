-- Plain PostgreSQL: the processor keeps the hourly and daily rollups and the retention of readings.
GRANT SELECT, INSERT, UPDATE, DELETE ON agg_1h, agg_1d TO kota_processor;
GRANT SELECT, INSERT, DELETE ON rollup_dirty TO kota_processor;
GRANT SELECT, DELETE ON readings_default TO kota_processor;

-- Daily partitions of readings are made and dropped by the processor, but making or dropping a
-- partition takes ownership of `readings`, and the owner may also drop or alter every table. So
-- the processor gets these two functions instead, which run as the schema's owner and do exactly
-- one thing: make the partition of one UTC day, or drop one of readings' daily partitions
-- (retention, which may delete old readings anyway). The name is made here, never passed in; the
-- search path is fixed so that no object of the caller's can stand in for ours.
CREATE FUNCTION kota_create_readings_partition(day date) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    name  text := 'readings_p' || to_char(day, 'YYYYMMDD');
    start timestamptz := day::timestamp AT TIME ZONE 'UTC';
BEGIN
    IF to_regclass(format('public.%I', name)) IS NOT NULL THEN
        RETURN false;
    END IF;
    EXECUTE format('CREATE TABLE IF NOT EXISTS public.%I PARTITION OF public.readings FOR VALUES FROM (%L) TO (%L)',
                   name, start, start + interval '1 day');
    RETURN true;
END
$$;

CREATE FUNCTION kota_drop_readings_partition(day date) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    name text := 'readings_p' || to_char(day, 'YYYYMMDD');
BEGIN
    IF NOT EXISTS (SELECT FROM pg_inherits WHERE inhparent = 'public.readings'::regclass
                   AND inhrelid = to_regclass(format('public.%I', name))) THEN
        RETURN false;
    END IF;
    EXECUTE format('DROP TABLE public.%I', name);
    RETURN true;
END
$$;

REVOKE ALL ON FUNCTION kota_create_readings_partition(date), kota_drop_readings_partition(date) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION kota_create_readings_partition(date), kota_drop_readings_partition(date)
    TO kota_processor;
