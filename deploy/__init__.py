"""Starts the real stack on one machine (stack.py) and describes it for many (compose/, k8s/)."""
