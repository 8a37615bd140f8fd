"""Starts the real services on one machine, a module each (install, mosquitto, postgres, kafka,
components; the whole stack: stack.py), and describes them for many (compose/, k8s/)."""
