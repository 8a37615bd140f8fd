-- Ops API: accounts with a role and a city scope, hashed API tokens, an audit log, noise limits,
-- and the notification that carries alert changes to the live feed.

-- operator: read, acknowledge and clear alerts; integrator: manage the devices of their cities;
-- admin: everything, in every city (`cities` is ignored for admins).
CREATE TABLE users (
    user_id      text PRIMARY KEY,
    display_name text,
    role         text NOT NULL CHECK (role IN ('operator', 'integrator', 'admin')),
    cities       text[] NOT NULL DEFAULT '{}',
    enabled      boolean NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- A token is "kota_<token_id>_<secret>"; only SHA-256 of the secret is kept. The secret is 256
-- random bits, so a fast hash is enough (no password to guess) and cheap on every request.
CREATE TABLE api_tokens (
    token_id     text PRIMARY KEY,
    user_id      text NOT NULL REFERENCES users ON DELETE CASCADE,
    secret_hash  bytea NOT NULL,
    label        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX api_tokens_by_user ON api_tokens (user_id);

-- Who did what, when: alert actions, device changes, accounts and tokens.
CREATE TABLE audit_log (
    event_id    bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    action      text NOT NULL,
    target_type text NOT NULL,
    target_id   text NOT NULL,
    city        text,
    details     jsonb NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_by_city ON audit_log (city, event_id DESC);

-- Noise limits per sensor (dB(A)); a sensor without a row uses the API's default (55 dB(A), the
-- residential limit of KepMenLH 48/1996).
CREATE TABLE noise_limits (
    device_id text PRIMARY KEY REFERENCES devices ON DELETE CASCADE,
    zone      text NOT NULL,
    limit_dba double precision NOT NULL CHECK (limit_dba > 0)
);

-- Every alert change is announced on commit, with what the live feed filters on.
CREATE FUNCTION kota_notify_alert_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('kota_alert_events', json_build_object(
        'event_id', NEW.event_id, 'alert_id', NEW.alert_id, 'action', NEW.action, 'actor', NEW.actor,
        'severity', NEW.severity, 'at', NEW.at, 'comment', NEW.comment,
        'device_id', a.device_id, 'city', a.city, 'domain', a.domain, 'alert_type', a.alert_type,
        'metric', a.metric, 'state', a.state, 'message', a.message, 'count', a.count)::text)
    FROM alerts a WHERE a.alert_id = NEW.alert_id;
    RETURN NULL;
END $$;
CREATE TRIGGER alert_events_notify AFTER INSERT ON alert_events
    FOR EACH ROW EXECUTE FUNCTION kota_notify_alert_event();
