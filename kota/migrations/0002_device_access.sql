-- Device access: MQTT credentials per device, and gateway devices that publish for others.

-- A gateway is one MQTT connection publishing for many devices of one city (ThingsBoard's
-- gateway, Hono's protocol adapter). Devices are bound to at most one gateway.
CREATE TABLE gateways (
    gateway_id         text PRIMARY KEY,
    city               text NOT NULL,
    mqtt_password_hash text,
    enabled            boolean NOT NULL DEFAULT true,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

-- Mosquitto's own salted PBKDF2-SHA512 format ($7$...), so the broker's password file is
-- generated straight from the registry. A device may also (or only) use a client certificate
-- whose common name is its device id.
ALTER TABLE devices
    ADD COLUMN mqtt_password_hash text,
    ADD COLUMN gateway_id text REFERENCES gateways (gateway_id) ON DELETE SET NULL;
CREATE INDEX devices_by_gateway ON devices (gateway_id) WHERE gateway_id IS NOT NULL;
