-- Alert rules operators edit (processing/rulebook.py, docs/rules.md): one rule set per city, as
-- versions that are never changed. Each change is a new row with its author, comment and time; a
-- rollback is a new row copying an older body (rolled_back_to says which). A city without a row
-- is judged by the defaults (today's behaviour), which the API shows as its version 0.
CREATE TABLE rule_versions (
    city           text NOT NULL,
    version        integer NOT NULL CHECK (version > 0),
    body           jsonb NOT NULL,
    author         text NOT NULL,
    comment        text NOT NULL DEFAULT '',
    created_at     timestamptz NOT NULL DEFAULT now(),
    rolled_back_to integer,
    PRIMARY KEY (city, version)
);

-- A change counter for every city's rules, which the processor reads once per batch (one row, one
-- index lookup) and loads the rule sets again when it moved: the same scheme as registry_version
-- (migration 0006), bumped before the statement so two writers queue on this row, never deadlock.
CREATE TABLE rules_version (
    single  boolean PRIMARY KEY DEFAULT true CHECK (single),
    version bigint NOT NULL
);
INSERT INTO rules_version (single, version) VALUES (true, 0);

CREATE FUNCTION kota_bump_rules_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE rules_version SET version = version + 1;
    RETURN NULL;
END
$$;
CREATE TRIGGER rule_versions_bump_rules_version BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON rule_versions
    FOR EACH STATEMENT EXECUTE FUNCTION kota_bump_rules_version();

-- How far each series' one-minute aggregates have been judged by the custom rules: minutes before
-- judged_before were judged by a committed batch (in its transaction), so a restart or a replay
-- judges none twice. Written by the processor only.
CREATE TABLE rule_watermarks (
    device_id     text NOT NULL,
    metric        text NOT NULL,
    judged_before timestamptz NOT NULL,
    PRIMARY KEY (device_id, metric)
);

-- The processor reads the rules and keeps its watermarks; the API reads and appends versions (with
-- the audit log, granted in 0011) and bumps the counter through the trigger.
GRANT SELECT ON rule_versions, rules_version, noise_limits TO kota_processor;
GRANT SELECT, INSERT, UPDATE ON rule_watermarks TO kota_processor;
GRANT SELECT, INSERT ON rule_versions TO kota_api;
GRANT SELECT, UPDATE ON rules_version TO kota_api;
