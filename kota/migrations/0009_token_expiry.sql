-- API tokens expire, and every change to who may do what is announced to the API at once.

-- NULL: never (only when asked for: `kota users token NAME --expires never`). Tokens issued before
-- this migration get the default lifetime from now, rather than living for ever.
ALTER TABLE api_tokens ADD COLUMN expires_at timestamptz;
UPDATE api_tokens SET expires_at = now() + interval '90 days' WHERE revoked_at IS NULL;

-- A change of role, cities or enabled, a revoked or re-dated token, or a deleted account: the API
-- forgets what it had verified for that user and re-checks their open live streams (LISTEN in
-- ops_api/live.py). Only real changes: the API updates last_used_at on every verification, and
-- `kota users add` rewrites a user row even when nothing changed. The payload is a hint, never
-- trusted: anyone connected may NOTIFY, and all it makes the API do is ask the database again.
CREATE FUNCTION kota_notify_access_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('kota_access_changed', json_build_object(
        'user_id', CASE WHEN TG_OP = 'DELETE' THEN OLD.user_id ELSE NEW.user_id END)::text);
    IF TG_OP = 'UPDATE' AND OLD.user_id IS DISTINCT FROM NEW.user_id THEN
        PERFORM pg_notify('kota_access_changed', json_build_object('user_id', OLD.user_id)::text);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER users_access_changed AFTER UPDATE ON users FOR EACH ROW
    WHEN (OLD.role IS DISTINCT FROM NEW.role OR OLD.cities IS DISTINCT FROM NEW.cities
          OR OLD.enabled IS DISTINCT FROM NEW.enabled OR OLD.user_id IS DISTINCT FROM NEW.user_id)
    EXECUTE FUNCTION kota_notify_access_changed();
CREATE TRIGGER users_access_deleted AFTER DELETE ON users FOR EACH ROW
    EXECUTE FUNCTION kota_notify_access_changed();
CREATE TRIGGER api_tokens_access_changed AFTER UPDATE ON api_tokens FOR EACH ROW
    WHEN (OLD.revoked_at IS DISTINCT FROM NEW.revoked_at OR OLD.expires_at IS DISTINCT FROM NEW.expires_at
          OR OLD.secret_hash IS DISTINCT FROM NEW.secret_hash OR OLD.user_id IS DISTINCT FROM NEW.user_id)
    EXECUTE FUNCTION kota_notify_access_changed();
CREATE TRIGGER api_tokens_access_deleted AFTER DELETE ON api_tokens FOR EACH ROW
    EXECUTE FUNCTION kota_notify_access_changed();
