"""The local broker's limits, written into its config and watched by the broker guard."""

from __future__ import annotations

# The broker's limits (docs/security.md, "Broker limits"). Only the ingest gateways subscribe, so
# the queue bounds are in effect theirs.
# - max_packet_size: the gateway's payload limit (GatewaySettings.max_payload_bytes, 256 KiB) plus
#   the largest PUBLISH header: 5 bytes fixed header, 2 + the longest topic
#   (kota/{city}/{domain}/{device}/telemetry with 64-character ids: 156 bytes), 2 bytes packet id;
#   rounded up to 1 KiB. A larger packet could only have been dead-lettered `oversized`; the broker
#   now refuses it (disconnects the sender, no PUBACK) instead of holding it.
# - max_inflight_messages: per subscriber, delivered and not yet acknowledged; twice the gateway's
#   batch (KOTA_GATEWAY_BATCH_MAX_MESSAGES, 5,000), so one batch is delivered while one is in Kafka.
# - max_queued_messages / max_queued_bytes: per subscriber, waiting beyond those in flight (a
#   gateway restarting, Kafka down). Beyond either bound Mosquitto drops a QoS 1 message for that
#   session after acknowledging it, so they are set far above a restart: 2,000,000 messages is
#   100 s at 20,000 messages/s (above what this broker accepts on a small machine) and 1 GiB of
#   payloads is 100 s at 10 MB/s (gateway batches of 100 readings, about 6 KB each, at 1,700/s).
BROKER_MAX_PACKET_BYTES = 256 * 1024 + 1024
#   The broker guard locks devices out above 80% of either (mqtt_access.guard_ingest), so the broker
#   refuses devices before it could drop what it acknowledged.
BROKER_MAX_QUEUED_MESSAGES = 2_000_000
BROKER_MAX_QUEUED_BYTES = 1024**3
BROKER_LIMITS = f"""max_packet_size {BROKER_MAX_PACKET_BYTES}
max_inflight_messages 10000
max_queued_messages {BROKER_MAX_QUEUED_MESSAGES}
max_queued_bytes {BROKER_MAX_QUEUED_BYTES}"""
