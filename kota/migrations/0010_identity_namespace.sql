-- One identity namespace for the broker: devices, gateways and the platform's own accounts.
--
-- Every MQTT login is one of these ids. Device and gateway ids were unique only within their own
-- table, and nothing kept a device from taking a system account's name (`kota-ingest`): the
-- broker's password file then held that name twice, and on Mosquitto 2.0.11 the later password
-- wins. Each device and gateway now claims its id here (a trigger, in the same transaction), so
-- an id is held by one kind at a time, and ids reserved for the platform are refused. The same
-- rule is checked in Python first (kota.contract.is_reserved_id) for a readable error.
--
-- A registry that already holds a reserved id, or a device and a gateway of the same id, stops
-- this migration with the offending id named: remove or rename it, then migrate again.
CREATE TABLE mqtt_identities (
    id   text PRIMARY KEY,
    kind text NOT NULL CHECK (kind IN ('device', 'gateway', 'system')),
    CONSTRAINT mqtt_identities_reserved CHECK (
        kind = 'system' OR NOT (lower(id) LIKE 'kota-%' OR lower(id) LIKE 'kota\_%'
                                OR lower(id) IN ('postgres', 'admin', 'root', 'mosquitto')))
);

INSERT INTO mqtt_identities (id, kind) VALUES ('kota-ingest', 'system'), ('kota-guard', 'system'),
    ('kota-reload-probe', 'system');
INSERT INTO mqtt_identities (id, kind) SELECT device_id, 'device' FROM devices;
INSERT INTO mqtt_identities (id, kind) SELECT gateway_id, 'gateway' FROM gateways;

-- BEFORE INSERT fires for an upsert too (INSERT ... ON CONFLICT DO UPDATE), so the claim tolerates
-- the row's own earlier claim and refuses only another kind's. SECURITY DEFINER: a component that
-- may write devices (the API) needs no rights on this table.
CREATE FUNCTION kota_claim_identity() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp AS $$
DECLARE
    wanted text := to_jsonb(NEW) ->> TG_ARGV[1];
    holder text;
BEGIN
    IF TG_OP = 'UPDATE' AND wanted = to_jsonb(OLD) ->> TG_ARGV[1] THEN
        RETURN NEW;
    END IF;
    INSERT INTO mqtt_identities (id, kind) VALUES (wanted, TG_ARGV[0]) ON CONFLICT (id) DO NOTHING;
    SELECT kind INTO holder FROM mqtt_identities WHERE id = wanted;
    IF holder IS DISTINCT FROM TG_ARGV[0] THEN
        RAISE EXCEPTION 'id % is already taken by a %', wanted, holder USING ERRCODE = 'unique_violation';
    END IF;
    IF TG_OP = 'UPDATE' THEN
        DELETE FROM mqtt_identities WHERE id = to_jsonb(OLD) ->> TG_ARGV[1] AND kind = TG_ARGV[0];
    END IF;
    RETURN NEW;
END
$$;

CREATE FUNCTION kota_release_identity() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
SET search_path = public, pg_temp AS $$
BEGIN
    DELETE FROM mqtt_identities WHERE id = to_jsonb(OLD) ->> TG_ARGV[1] AND kind = TG_ARGV[0];
    RETURN OLD;
END
$$;

CREATE TRIGGER devices_claim_identity BEFORE INSERT OR UPDATE OF device_id ON devices
    FOR EACH ROW EXECUTE FUNCTION kota_claim_identity('device', 'device_id');
CREATE TRIGGER devices_release_identity AFTER DELETE ON devices
    FOR EACH ROW EXECUTE FUNCTION kota_release_identity('device', 'device_id');
CREATE TRIGGER gateways_claim_identity BEFORE INSERT OR UPDATE OF gateway_id ON gateways
    FOR EACH ROW EXECUTE FUNCTION kota_claim_identity('gateway', 'gateway_id');
CREATE TRIGGER gateways_release_identity AFTER DELETE ON gateways
    FOR EACH ROW EXECUTE FUNCTION kota_release_identity('gateway', 'gateway_id');
