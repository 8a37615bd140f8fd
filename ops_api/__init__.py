"""Ops API: FastAPI service and command-centre page, reading what processing stored."""
