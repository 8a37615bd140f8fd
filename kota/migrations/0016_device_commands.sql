-- Commands to devices (kota/commands.py): one row per command, its lifecycle and who did what.
-- The API queues and approves (kota_api); the commander (`kota commander`, role kota_commander)
-- publishes, records the devices' replies and expires what outlived its time to live. Each step is
-- also in audit_log (target_type 'command').
CREATE TABLE device_commands (
    command_id      uuid PRIMARY KEY,
    device_id       text NOT NULL REFERENCES devices ON DELETE CASCADE,
    city            text NOT NULL,
    command         text NOT NULL,
    params          jsonb NOT NULL DEFAULT '{}'::jsonb,
    critical        boolean NOT NULL DEFAULT false,
    status          text NOT NULL CHECK (status IN ('awaiting_approval', 'queued', 'sent', 'acknowledged',
                                                    'succeeded', 'failed', 'expired')),
    requested_by    text NOT NULL,
    -- A critical command is approved by a second operator, never the one who asked.
    approved_by     text CHECK (approved_by IS DISTINCT FROM requested_by),
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    sent_at         timestamptz,
    last_sent_at    timestamptz,
    send_count      integer NOT NULL DEFAULT 0,
    acknowledged_at timestamptz,
    finished_at     timestamptz,
    result          jsonb,
    error           text,
    CHECK (NOT critical OR status IN ('awaiting_approval', 'expired') OR approved_by IS NOT NULL)
);
CREATE INDEX device_commands_by_device ON device_commands (device_id, created_at DESC);
CREATE INDEX device_commands_open ON device_commands (created_at)
    WHERE status IN ('awaiting_approval', 'queued', 'sent', 'acknowledged');

-- The commander's broker account is the platform's own: no device or gateway may take its name.
INSERT INTO mqtt_identities (id, kind) VALUES ('kota-commander', 'system') ON CONFLICT (id) DO NOTHING;

-- The commander's role, made here without LOGIN where deploy has not made it (as migration 0011 does).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'kota_commander') THEN
        CREATE ROLE kota_commander NOLOGIN;
    END IF;
END
$$;

-- The commander: reads where each device is, moves commands along their lifecycle, appends to the
-- audit log. It never creates a command (only the API does) and reads nothing else.
GRANT SELECT ON devices TO kota_commander;
GRANT SELECT, UPDATE ON device_commands TO kota_commander;
GRANT INSERT ON audit_log TO kota_commander;
GRANT USAGE ON SEQUENCE audit_log_event_id_seq TO kota_commander;

-- The API: queues commands, approves critical ones, serves their history.
GRANT SELECT, INSERT, UPDATE ON device_commands TO kota_api;
