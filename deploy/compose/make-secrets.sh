#!/usr/bin/env bash
# Makes every credential and TLS file deploy/compose/compose.yaml reads, in deploy/compose/secrets/
# (ignored by git). Run it before the first `docker compose up`; what exists is kept, so a second
# run adds only what is missing and rewrites the per-service env files from the password files.
#
#   deploy/compose/make-secrets.sh [BROKER_HOSTNAME ...]   # names devices use for the broker
#
# secrets/<name>.password  one random password per account (docs/deploy.md lists them)
# secrets/<service>.env    that service's KOTA_*_PASSWORD variables (compose env_file)
# secrets/mqtt-tls/        the broker's ca.crt, tls.crt, tls.key (mounted at /mosquitto/certs)
# secrets/pki/             the CA that signs the broker's and devices' certificates (ca.key stays here)
set -euo pipefail
out=${KOTA_COMPOSE_SECRETS:-"$(cd "$(dirname "$0")" && pwd)/secrets"}
umask 077
mkdir -p "$out/mqtt-tls" "$out/pki"
chmod 700 "$out"

password() {  # secrets/<name>.password, made once
  local file="$out/$1.password"
  if [ ! -s "$file" ]; then
    openssl rand -base64 33 | tr '+/' '-_' | tr -d '\n=' >"$file"
  fi
  # Compose mounts a secret file as it is on the host; the containers given it read it as another
  # user. The folder (0700) keeps it from other users of this host.
  chmod 644 "$file"
}

for role in postgres kota_owner kota_processor kota_gateway kota_api kota_notifier kota_commander; do password "postgres-$role"; done
for user in kota-admin kota-gateway kota-processor kota-api; do password "kafka-$user"; done
password mqtt-kota-ingest
password mqtt-kota-commander
password notifications-key  # channel secrets at rest and acknowledge links: the API's and the notifier's

secret() { cat "$out/$1.password"; }
env_file() {  # <service> VAR=secret-name ...
  local file="$out/$1.env"
  shift
  : >"$file"
  for pair in "$@"; do
    echo "${pair%%=*}=$(secret "${pair#*=}")" >>"$file"
  done
  chmod 600 "$file"
}
env_file migrate KOTA_POSTGRES_PASSWORD=postgres-kota_owner KOTA_KAFKA_PASSWORD=kafka-kota-admin
env_file gateway KOTA_POSTGRES_PASSWORD=postgres-kota_gateway KOTA_KAFKA_PASSWORD=kafka-kota-gateway \
  KOTA_GATEWAY_MQTT_PASSWORD=mqtt-kota-ingest
env_file broker-access KOTA_POSTGRES_PASSWORD=postgres-kota_gateway KOTA_GATEWAY_MQTT_PASSWORD=mqtt-kota-ingest \
  KOTA_COMMANDER_MQTT_PASSWORD=mqtt-kota-commander
env_file commander KOTA_POSTGRES_PASSWORD=postgres-kota_commander KOTA_COMMANDER_MQTT_PASSWORD=mqtt-kota-commander
env_file processor KOTA_POSTGRES_PASSWORD=postgres-kota_processor KOTA_KAFKA_PASSWORD=kafka-kota-processor
env_file api KOTA_POSTGRES_PASSWORD=postgres-kota_api KOTA_KAFKA_PASSWORD=kafka-kota-api \
  KOTA_NOTIFICATIONS_KEY=notifications-key
env_file notifier KOTA_POSTGRES_PASSWORD=postgres-kota_notifier KOTA_NOTIFICATIONS_KEY=notifications-key

# The CA: P-256, ten years. It signs the broker's certificate and device client certificates.
pki="$out/pki"
if [ ! -s "$pki/ca.key" ]; then
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$pki/ca.key"
  openssl req -x509 -new -key "$pki/ca.key" -sha256 -days 3650 -subj "/O=kotacerdas/CN=kotacerdas CA" \
    -addext "basicConstraints=critical,CA:true,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out "$pki/ca.crt" 2>/dev/null
fi

# The broker's certificate, for every name devices use (and the service name inside compose).
tls="$out/mqtt-tls"
if [ ! -s "$tls/tls.key" ]; then
  names=("$@" mosquitto localhost)
  san=""
  for name in "${names[@]}"; do
    if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then san+="IP:$name,"; else san+="DNS:$name,"; fi
  done
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$tls/tls.key"
  openssl req -new -key "$tls/tls.key" -subj "/O=kotacerdas/CN=${names[0]}" -out "$tls/tls.csr"
  printf 'basicConstraints=critical,CA:false\nextendedKeyUsage=serverAuth\nsubjectAltName=%s\n' "${san%,}" \
    >"$tls/tls.ext"
  openssl x509 -req -in "$tls/tls.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -set_serial "0x$(openssl rand -hex 16)" \
    -days 825 -sha256 -extfile "$tls/tls.ext" -out "$tls/tls.crt" 2>/dev/null
  rm -f "$tls/tls.csr" "$tls/tls.ext"
fi
cp "$pki/ca.crt" "$tls/ca.crt"
# Mounted as the broker's /mosquitto/certs: Mosquitto reads its key after dropping to its own user
# (uid 1883 in the image). On this host, secrets/ (0700) keeps them from other users.
chmod 755 "$tls"
chmod 644 "$tls/ca.crt" "$tls/tls.crt" "$tls/tls.key"
echo "secrets in $out; broker certificate for: $(openssl x509 -in "$tls/tls.crt" -noout -ext subjectAltName | tail -1)"
