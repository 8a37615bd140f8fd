-- A change counter for the device registry (devices and gateways), which the gateways and the
-- broker-access sidecar poll to know when to read the registry again.
--
-- It replaces "row count plus max(updated_at)": updated_at is now(), the time a transaction
-- started, so a change that started before a reader's poll and committed after it could leave
-- max(updated_at) as it was (another row's was newer), and the reader kept a stale device for good.
-- The counter row is updated by every transaction that writes the registry, so its committed value
-- changes exactly when such a transaction commits. Bumped BEFORE the statement: a transaction
-- takes the counter's row lock before any registry row lock, so two registry writers cannot
-- deadlock on it; registry writes are rare and short, and they queue here one at a time.
CREATE TABLE registry_version (
    single  boolean PRIMARY KEY DEFAULT true CHECK (single),
    version bigint NOT NULL
);
INSERT INTO registry_version (single, version) VALUES (true, 0);

-- Once per transaction (a transaction-local flag): the lock is held to commit either way, and
-- bumping on every statement made a 10,000-device upsert (one statement per device) ten times slower.
CREATE FUNCTION kota_bump_registry_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('kota.registry_bumped', true) IS DISTINCT FROM 'yes' THEN
        UPDATE registry_version SET version = version + 1;
        PERFORM set_config('kota.registry_bumped', 'yes', true);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER devices_bump_registry_version BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON devices
    FOR EACH STATEMENT EXECUTE FUNCTION kota_bump_registry_version();
CREATE TRIGGER gateways_bump_registry_version BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON gateways
    FOR EACH STATEMENT EXECUTE FUNCTION kota_bump_registry_version();
