-- One role per component, each granted only what it does (least privilege). kota_owner, which runs
-- the migrations, owns every object here; deploy (deploy/postgres_access.py) makes the roles LOGIN
-- with their passwords. A database migrated before the roles exist (PGlite, a server that deploy
-- did not make) gets them here, without LOGIN; making a role takes CREATEROLE, which kota_owner
-- does not have, so there the roles must exist first. Later migrations grant their own objects.
DO $$
DECLARE
    role text;
BEGIN
    FOREACH role IN ARRAY ARRAY['kota_processor', 'kota_gateway', 'kota_api'] LOOP
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = role) THEN
            EXECUTE format('CREATE ROLE %I NOLOGIN', role);
        END IF;
    END LOOP;
END
$$;

-- Nobody but the owner makes objects in the schema (PostgreSQL 15's default; said again for
-- databases made by older servers).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;

-- The gateway and the broker-access sidecar: the device registry, read only.
GRANT SELECT ON devices, gateways, registry_version TO kota_gateway;

-- The processor: readings and everything derived from them, its offsets and checkpoints.
GRANT SELECT ON devices, flood_gates, retention_settings, schema_migrations TO kota_processor;
GRANT SELECT, INSERT ON readings TO kota_processor;
GRANT SELECT, INSERT, UPDATE ON latest_values, stream_offsets, detector_checkpoints, station_ispu, gate_status,
    alerts TO kota_processor;
GRANT SELECT, INSERT, UPDATE, DELETE ON agg_1m, anomalies, late_readings TO kota_processor;
GRANT INSERT ON alert_events TO kota_processor;
GRANT USAGE ON SEQUENCE alerts_alert_id_seq, alert_events_event_id_seq TO kota_processor;

-- The API: reads what it serves; acknowledges and clears alerts; changes devices, accounts and
-- tokens, noise limits; appends to the audit log. Never readings, never DDL. It reads gateways
-- too: a device it registers reaches the broker's access files at once (deploy/mqtt_access.py).
GRANT SELECT ON devices, gateways, latest_values, readings, agg_1m, agg_1h, agg_1d, alerts, alert_events, station_ispu,
    flood_gates, gate_status, stream_offsets, users, api_tokens, audit_log, noise_limits, registry_version
    TO kota_api;
GRANT INSERT, UPDATE ON devices, users, api_tokens TO kota_api;
GRANT UPDATE ON alerts TO kota_api;
GRANT INSERT ON alert_events, audit_log TO kota_api;
GRANT INSERT, UPDATE, DELETE ON noise_limits TO kota_api;
-- A change to devices bumps the registry's version (trigger of migration 0006, run as the writer).
GRANT UPDATE ON registry_version TO kota_api;
GRANT USAGE ON SEQUENCE alert_events_event_id_seq, audit_log_event_id_seq TO kota_api;
