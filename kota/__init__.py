"""kotacerdas core: the pieces every stage of the data path shares.

- `kota.settings`: where the local stack lives (state folder, ports).
- `kota.contract`: the wire contract (canonical reading, topics, reason codes).
- `kota.schema`: the one database schema, applied by versioned migrations.
- `kota.registry`: the device registry (who may send what).
"""
