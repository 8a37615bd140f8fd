"""Simulators: a simulated city publishing over MQTT as real devices would."""
