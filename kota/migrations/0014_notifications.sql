-- Notifications: channels (webhook, email, Telegram) with their secrets encrypted, subscriptions that
-- route alert events to them, and an outbox written by a trigger in the transaction of the alert
-- event itself, so a message exists exactly once per (event, subscription) whoever wrote the event
-- (the processor or the API). The notifier (notifier/) delivers the outbox and records every attempt.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'kota_notifier') THEN
        CREATE ROLE kota_notifier NOLOGIN;
    END IF;
END
$$;

-- `config` holds what is not secret (a URL, an SMTP host and addresses, a chat id); `secret` is the
-- one secret (webhook key, SMTP password, bot token) as a Fernet token (kota/notifications.py),
-- whose key lives in the state's secrets folder, never in the database.
CREATE TABLE notification_channels (
    channel_id      bigserial PRIMARY KEY,
    city            text NOT NULL,
    name            text NOT NULL,
    kind            text NOT NULL CHECK (kind IN ('webhook', 'email', 'telegram')),
    config          jsonb NOT NULL DEFAULT '{}'::jsonb,
    secret          bytea,
    enabled         boolean NOT NULL DEFAULT true,
    telegram_offset bigint NOT NULL DEFAULT 0,  -- getUpdates: the next update the notifier wants
    created_by      text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (city, name)
);

-- Which events of a city reach a channel, in which language, when, and how many at most.
CREATE TABLE notification_subscriptions (
    subscription_id  bigserial PRIMARY KEY,
    channel_id       bigint NOT NULL REFERENCES notification_channels ON DELETE CASCADE,
    city             text NOT NULL,
    domain           text,              -- NULL: every domain
    district         text,              -- NULL: every district
    alert_types      text[],            -- NULL: every type
    min_severity     text NOT NULL DEFAULT 'warning' CHECK (kota_severity_rank(min_severity) > 0),
    language         text NOT NULL DEFAULT 'id' CHECK (language IN ('id', 'en')),
    -- Tier 1 hears every event; tier n > 1 only once an alert of at least min_severity stayed
    -- unacknowledged escalate_after_s seconds since it was raised and the notifier escalated it.
    tier             integer NOT NULL DEFAULT 1 CHECK (tier BETWEEN 1 AND 9),
    escalate_after_s integer CHECK (escalate_after_s > 0),
    quiet_start      time,              -- local time of `timezone`; both NULL: never quiet
    quiet_end        time,
    timezone         text NOT NULL DEFAULT 'Asia/Jakarta',
    digest_limit     integer NOT NULL DEFAULT 10 CHECK (digest_limit > 0),
    digest_window_s  integer NOT NULL DEFAULT 600 CHECK (digest_window_s > 0),
    enabled          boolean NOT NULL DEFAULT true,
    created_by       text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((quiet_start IS NULL) = (quiet_end IS NULL)),
    CHECK (tier = 1 OR escalate_after_s IS NOT NULL)
);
CREATE INDEX notification_subscriptions_by_city ON notification_subscriptions (city) WHERE enabled;

-- The tier an alert's events reach (1 until the notifier escalates it).
ALTER TABLE alerts ADD COLUMN notify_tier integer NOT NULL DEFAULT 1;

-- One message per (event, subscription), or a test or digest message of a channel. Statuses:
-- pending (due at next_attempt_at), sending (an attempt was committed before its send; the lease
-- runs to next_attempt_at), sent, failed (gave up: last_error says why), suppressed (quiet hours),
-- held (over the subscription's limit: goes into the next digest), digested (went into digest_id).
CREATE TABLE notification_outbox (
    message_id         bigserial PRIMARY KEY,
    kind               text NOT NULL DEFAULT 'event' CHECK (kind IN ('event', 'test', 'digest')),
    event_id           bigint REFERENCES alert_events ON DELETE CASCADE,
    alert_id           bigint REFERENCES alerts ON DELETE CASCADE,
    subscription_id    bigint REFERENCES notification_subscriptions ON DELETE CASCADE,
    channel_id         bigint NOT NULL REFERENCES notification_channels ON DELETE CASCADE,
    city               text NOT NULL,
    severity           text,
    body               jsonb,           -- test and digest messages: what to say
    status             text NOT NULL DEFAULT 'pending'
                       CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'suppressed', 'held', 'digested')),
    attempts           integer NOT NULL DEFAULT 0,
    next_attempt_at    timestamptz NOT NULL DEFAULT now(),
    possible_duplicate boolean NOT NULL DEFAULT false,
    last_error         text,
    digest_id          bigint REFERENCES notification_outbox ON DELETE SET NULL,
    created_at         timestamptz NOT NULL DEFAULT now(),
    dispatched_at      timestamptz,     -- first attempt: what the per-subscription limit counts
    sent_at            timestamptz,
    UNIQUE (event_id, subscription_id),
    CHECK (kind <> 'event' OR (event_id IS NOT NULL AND subscription_id IS NOT NULL))
);
CREATE INDEX notification_outbox_due ON notification_outbox (next_attempt_at) WHERE status IN ('pending', 'sending');
CREATE INDEX notification_outbox_by_subscription ON notification_outbox (subscription_id, dispatched_at);
CREATE INDEX notification_outbox_held ON notification_outbox (subscription_id) WHERE status = 'held';
CREATE INDEX notification_outbox_by_city ON notification_outbox (city, message_id DESC);

-- Every attempt: 'sending' is written and committed before the send, then becomes sent or failed;
-- one still 'sending' when its lease ran out was cut by a crash and reads 'interrupted'.
CREATE TABLE notification_attempts (
    attempt_id  bigserial PRIMARY KEY,
    message_id  bigint NOT NULL REFERENCES notification_outbox ON DELETE CASCADE,
    attempt     integer NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    outcome     text NOT NULL DEFAULT 'sending' CHECK (outcome IN ('sending', 'sent', 'failed', 'interrupted')),
    error       text,
    retry_at    timestamptz,  -- a failed attempt: when the next one is due (none: given up)
    UNIQUE (message_id, attempt)
);

-- Acknowledge links are single use: the nonce of each one used.
CREATE TABLE notification_ack_uses (
    nonce   text PRIMARY KEY,
    used_at timestamptz NOT NULL DEFAULT now(),
    actor   text NOT NULL
);

-- The outbox, in the transaction of the event. SECURITY DEFINER: whoever writes alert events (the
-- processor, the API, the notifier) needs no right on subscriptions or the outbox for it.
CREATE FUNCTION kota_notification_outbox() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
BEGIN
    INSERT INTO notification_outbox (kind, event_id, alert_id, subscription_id, channel_id, city, severity)
    SELECT 'event', NEW.event_id, a.alert_id, s.subscription_id, s.channel_id, a.city, NEW.severity
    FROM alerts a
    LEFT JOIN devices d ON d.device_id = a.device_id
    JOIN notification_subscriptions s ON s.city = a.city AND s.enabled
    JOIN notification_channels c ON c.channel_id = s.channel_id AND c.enabled
    WHERE a.alert_id = NEW.alert_id
      AND (s.domain IS NULL OR s.domain = a.domain)
      AND (s.district IS NULL OR s.district = d.district)
      AND (s.alert_types IS NULL OR a.alert_type = ANY (s.alert_types))
      AND kota_severity_rank(NEW.severity) >= kota_severity_rank(s.min_severity)
      AND s.tier <= a.notify_tier
    ON CONFLICT (event_id, subscription_id) DO NOTHING;
    RETURN NULL;
END $$;
REVOKE ALL ON FUNCTION kota_notification_outbox() FROM PUBLIC;
CREATE TRIGGER alert_events_notification_outbox AFTER INSERT ON alert_events
    FOR EACH ROW WHEN (NEW.action IN ('raised', 'escalated', 'acknowledged', 'cleared'))
    EXECUTE FUNCTION kota_notification_outbox();

-- The notifier: reads what it renders, keeps the outbox and its attempts, acknowledges alerts from
-- the Telegram button and escalates unacknowledged ones (an alert event each, and the audit log).
GRANT SELECT ON devices, alerts, alert_events, station_ispu, gate_status, notification_channels,
    notification_subscriptions TO kota_notifier;
GRANT UPDATE (telegram_offset) ON notification_channels TO kota_notifier;
GRANT SELECT, INSERT, UPDATE ON notification_outbox, notification_attempts TO kota_notifier;
-- Retention (KOTA_NOTIFIER_KEEP_DAYS): finished messages, and the used nonces of expired links.
GRANT DELETE ON notification_outbox TO kota_notifier;
GRANT SELECT, DELETE ON notification_ack_uses TO kota_notifier;
GRANT UPDATE (state, acknowledged_at, acknowledged_by, updated_at, notify_tier) ON alerts TO kota_notifier;
GRANT INSERT ON alert_events, audit_log TO kota_notifier;
GRANT USAGE ON SEQUENCE notification_outbox_message_id_seq, notification_attempts_attempt_id_seq,
    alert_events_event_id_seq, audit_log_event_id_seq TO kota_notifier;

-- The API: manages channels and subscriptions, reads deliveries, queues test messages, and
-- acknowledges from a link (single use).
GRANT SELECT, INSERT, UPDATE, DELETE ON notification_channels, notification_subscriptions TO kota_api;
GRANT SELECT ON notification_outbox, notification_attempts TO kota_api;
GRANT INSERT ON notification_outbox TO kota_api;
GRANT SELECT, INSERT ON notification_ack_uses TO kota_api;
GRANT USAGE ON SEQUENCE notification_channels_channel_id_seq, notification_subscriptions_subscription_id_seq,
    notification_outbox_message_id_seq TO kota_api;
