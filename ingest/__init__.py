"""Ingest: MQTT → check and normalise → Kafka. Knows the contract and the registry, nothing downstream."""
