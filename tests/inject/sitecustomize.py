"""Loaded by a gateway the boundary test starts with this folder on PYTHONPATH: checking a message
that carries the marker raises, as a bug in the parser would. Nothing in the product knows of it."""

import ingest.parse

MARKER = b"kota-test-raise-inside-the-parser"
_real_parse = ingest.parse.parse_message


def _parse_with_a_bug(topic, payload, **kwargs):
    if MARKER in payload:
        raise RuntimeError("a bug in checking this message")
    return _real_parse(topic, payload, **kwargs)


ingest.parse.parse_message = _parse_with_a_bug
