"""The `kota` command: one entry point for every part of the platform, above every stage.

cli/stack.py        kota up / down / status / install / migrate: the whole local stack
cli/components.py   kota gateway / processor / api: one component in the foreground
cli/city.py         kota simulate / replay / score: the testers' tools
cli/registry.py     kota devices / users: the device registry and ops accounts
cli/broker.py       kota broker-access / broker-guard / rotate-ingest-password
cli/deadletters.py  kota deadletters: rejected input, with reasons
cli/main.py         the parser that assembles them
"""
