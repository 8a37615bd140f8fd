-- A message rate of its own for an MQTT account (ingest/ratelimit.py). NULL: the gateway's default
-- for its kind (KOTA_GATEWAY_DEVICE_RATE_PER_S, KOTA_GATEWAY_GATEWAY_RATE_PER_S); 0: no limit, for
-- testing accounts that publish history as fast as the broker takes it (kota simulate, kota replay).
ALTER TABLE devices ADD COLUMN rate_limit_per_s double precision CHECK (rate_limit_per_s >= 0);
ALTER TABLE gateways ADD COLUMN rate_limit_per_s double precision CHECK (rate_limit_per_s >= 0);
