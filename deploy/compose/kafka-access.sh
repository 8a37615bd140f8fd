#!/bin/bash
# Run once per deploy as kota-admin (the super user): each component's SCRAM password set again
# from the secrets (so a rotated secret takes effect; kota-admin's own needs a broker restart), and
# the ACLs, the same as the local stack's (deploy/kafka_access.py). With
# allow.everyone.if.no.acl.found=false, whatever is not granted here is refused.
set -euo pipefail
secrets=/run/secrets
bootstrap=${KAFKA_BOOTSTRAP:-kafka:9092}
umask 077
admin=/tmp/admin.properties
cat >"$admin" <<PROPS
security.protocol=SASL_PLAINTEXT
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="kota-admin" password="$(cat "$secrets/kafka-kota-admin.password")";
PROPS
for user in kota-gateway kota-processor kota-api; do
  /opt/kafka/bin/kafka-configs.sh --bootstrap-server "$bootstrap" --command-config "$admin" --alter \
    --entity-type users --entity-name "$user" \
    --add-config "SCRAM-SHA-512=[iterations=8192,password=$(cat "$secrets/kafka-$user.password")]"
done
acl() {  # acl USER kafka-acls.sh options...
  /opt/kafka/bin/kafka-acls.sh --bootstrap-server "$bootstrap" --command-config "$admin" --add \
    --allow-principal "User:$1" "${@:2}"
}
acl kota-gateway --operation Write --operation Describe --topic kota.readings
acl kota-gateway --operation Write --operation Describe --topic kota.deadletter
acl kota-gateway --operation IdempotentWrite --cluster
acl kota-processor --operation Read --operation Describe --topic kota.readings
acl kota-processor --operation Read --operation Describe --group kota-processor --resource-pattern-type prefixed
acl kota-api --operation Read --operation Describe --topic kota.readings
acl kota-api --operation Read --operation Describe --topic kota.deadletter
