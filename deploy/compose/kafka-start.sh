#!/bin/bash
# The kafka service's entrypoint: kafka.properties plus the broker's own logins (kota-admin, from
# the secrets) into a private file; on first start the storage is formatted with every SCRAM user
# (KRaft takes them only at format time, before any client can log in); then the broker.
set -euo pipefail
secrets=/run/secrets
run=/tmp/kota-kafka
umask 077
mkdir -p "$run"
admin=$(cat "$secrets/kafka-kota-admin.password")
{
  cat /etc/kota/kafka.properties
  echo "listener.name.client.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username=\"kota-admin\" password=\"$admin\";"
  echo "listener.name.controller.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username=\"kota-admin\" password=\"$admin\" user_kota-admin=\"$admin\";"
} >"$run/server.properties"
# For the health check and kafka-access.sh's tools.
cat >"$run/admin.properties" <<PROPS
security.protocol=SASL_PLAINTEXT
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="kota-admin" password="$admin";
PROPS
if [ ! -f /var/lib/kafka/data/meta.properties ]; then
  scram=()
  for user in kota-admin kota-gateway kota-processor kota-api; do
    scram+=(--add-scram "SCRAM-SHA-512=[name=$user,password=$(cat "$secrets/kafka-$user.password")]")
  done
  /opt/kafka/bin/kafka-storage.sh format -t "$(/opt/kafka/bin/kafka-storage.sh random-uuid)" \
    -c "$run/server.properties" "${scram[@]}"
fi
exec /opt/kafka/bin/kafka-server-start.sh "$run/server.properties"
