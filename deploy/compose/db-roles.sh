#!/bin/sh
# Run as the superuser (postgres) before the migrations, on every deploy: one login role per
# component, made with its password or given its current one (so rotating a secret is: change it,
# run this again, restart the component). The kota database is owned by kota_owner, which runs
# the migrations; what each other role may do is granted there (kota/migrations/0011_roles.sql).
# deploy/k8s/config.yaml holds the same script.
#
# Reads $KOTA_SECRETS_DIR/postgres-<role>.password (default /run/secrets); PGHOST, PGDATABASE.
set -eu
secrets=${KOTA_SECRETS_DIR:-/run/secrets}
export PGUSER=postgres PGHOST="${PGHOST:-timescaledb}" PGDATABASE="${PGDATABASE:-kota}"
PGPASSWORD=$(cat "$secrets/postgres-postgres.password")
export PGPASSWORD
for role in kota_owner kota_processor kota_gateway kota_api kota_notifier kota_commander; do
  # The password goes to psql through its environment, never its command line.
  KOTA_ROLE_PASSWORD=$(cat "$secrets/postgres-$role.password") \
    psql -X -q -v ON_ERROR_STOP=1 -v role="$role" <<'SQL'
\getenv password KOTA_ROLE_PASSWORD
SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', :'role', :'password')
 WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('ALTER ROLE %I WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD %L', :'role', :'password') \gexec
SQL
done
psql -X -q -v ON_ERROR_STOP=1 <<'SQL'
-- TimescaleDB's extension needs a superuser; the migrations find it made.
SELECT 'CREATE EXTENSION IF NOT EXISTS timescaledb'
 WHERE EXISTS (SELECT FROM pg_available_extensions WHERE name = 'timescaledb') \gexec
SELECT format('ALTER DATABASE %I OWNER TO kota_owner', current_database()) \gexec
SQL
echo "roles kota_owner, kota_processor, kota_gateway, kota_api, kota_notifier, kota_commander ready in database $PGDATABASE"
