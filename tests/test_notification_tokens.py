"""Property tests of what a notification carries: the webhook signature (the notifier's and the one
docs/notifications.md gives receivers agree, and any change of body, secret or time fails) and the
acknowledge token (a round trip for every alert and subscription; any other text, a tampered or an
expired token is refused with BadToken, never another error); quiet hours across midnight."""

from __future__ import annotations

import datetime as dt
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kota.notifications import (
    MAX_TOKEN_CHARS,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    BadToken,
    NotificationKeys,
    verify_webhook,
    webhook_signature,
)
from notifier.delivery import in_quiet_hours
from tests.notify_servers import documented_verifier

VERIFY = documented_verifier()
secrets_ = st.text(min_size=1, max_size=64).filter(lambda s: "\x00" not in s)
ids = st.integers(min_value=1, max_value=2**62)


def _headers(secret: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {TIMESTAMP_HEADER: str(timestamp), SIGNATURE_HEADER: webhook_signature(secret, timestamp, body)}


@given(secret=secrets_, body=st.binary(max_size=2000))
def test_a_signed_body_verifies_with_the_documented_receiver_and_ours(secret: str, body: bytes) -> None:
    now = int(time.time())
    headers = _headers(secret, now, body)
    assert VERIFY(secret, headers, body)
    assert verify_webhook(secret, headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER], body, now)


@given(
    secret=secrets_,
    body=st.binary(min_size=1, max_size=500),
    position=st.integers(min_value=0),
    flip=st.integers(1, 255),
)
def test_any_change_of_the_body_fails(secret: str, body: bytes, position: int, flip: int) -> None:
    now = int(time.time())
    headers = _headers(secret, now, body)
    i = position % len(body)
    tampered = body[:i] + bytes([body[i] ^ flip]) + body[i + 1 :]
    assert not VERIFY(secret, headers, tampered)
    assert not verify_webhook(secret, headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER], tampered, now)


@given(secret=secrets_, other=secrets_, body=st.binary(max_size=200))
def test_another_secret_fails(secret: str, other: str, body: bytes) -> None:
    if other == secret:
        return
    headers = _headers(other, int(time.time()), body)
    assert not VERIFY(secret, headers, body)


@given(secret=secrets_, body=st.binary(max_size=200), skew=st.integers(min_value=301, max_value=10**9))
def test_an_old_or_future_timestamp_fails_even_when_signed(secret: str, body: bytes, skew: int) -> None:
    now = int(time.time())
    for timestamp in (now - skew, now + skew):
        if timestamp < 0:
            continue
        headers = _headers(secret, timestamp, body)
        assert not VERIFY(secret, headers, body)
        assert not verify_webhook(secret, headers[TIMESTAMP_HEADER], headers[SIGNATURE_HEADER], body, now)


@given(timestamp=st.text(max_size=20), signature=st.text(max_size=80), body=st.binary(max_size=50))
def test_arbitrary_headers_never_verify_and_never_raise(timestamp: str, signature: str, body: bytes) -> None:
    headers = {TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: signature}
    assert not VERIFY("secret", headers, body)
    assert not verify_webhook("secret", timestamp, signature, body, time.time())


KEYS = NotificationKeys("a test key that is long enough")


@given(alert_id=ids, subscription_id=ids, ttl=st.integers(min_value=1, max_value=10**8))
def test_an_ack_token_round_trips(alert_id: int, subscription_id: int, ttl: int) -> None:
    now = int(time.time())
    token = KEYS.ack_token(alert_id, subscription_id, now + ttl)
    assert len(token) <= MAX_TOKEN_CHARS
    parsed = KEYS.parse_ack_token(token, now)
    assert (parsed.alert_id, parsed.subscription_id, parsed.expires_unix) == (alert_id, subscription_id, now + ttl)
    assert parsed.nonce != KEYS.parse_ack_token(KEYS.ack_token(alert_id, subscription_id, now + ttl), now).nonce


@given(text=st.text(max_size=300))
def test_any_text_is_refused_with_bad_token_only(text: str) -> None:
    with pytest.raises(BadToken):
        KEYS.parse_ack_token(text, time.time())


@given(alert_id=ids, subscription_id=ids, position=st.integers(min_value=0), replacement=st.sampled_from("AZaz09-_."))
def test_a_tampered_token_is_refused(alert_id: int, subscription_id: int, position: int, replacement: str) -> None:
    token = KEYS.ack_token(alert_id, subscription_id, int(time.time()) + 600)
    i = position % len(token)
    tampered = token[:i] + replacement + token[i + 1 :]
    if tampered == token:
        return
    with pytest.raises(BadToken):
        KEYS.parse_ack_token(tampered, time.time())


@given(alert_id=ids, subscription_id=ids, age=st.integers(min_value=1, max_value=10**8))
def test_an_expired_or_foreign_token_is_refused(alert_id: int, subscription_id: int, age: int) -> None:
    now = int(time.time())
    with pytest.raises(BadToken, match="expired"):
        KEYS.parse_ack_token(KEYS.ack_token(alert_id, subscription_id, now - age), now)
    with pytest.raises(BadToken, match="signature"):
        KEYS.parse_ack_token(NotificationKeys("another key").ack_token(alert_id, subscription_id, now + 60), now)


@given(secret=st.text(min_size=1, max_size=100))
def test_a_channel_secret_round_trips_and_is_not_stored_in_the_clear(secret: str) -> None:
    token = KEYS.encrypt(secret)
    assert KEYS.decrypt(token) == secret
    if len(secret) >= 4:
        assert secret.encode() not in token
    with pytest.raises(ValueError, match="does not decrypt"):
        NotificationKeys("another key").decrypt(token)


minutes = st.integers(min_value=0, max_value=24 * 60 - 1)


@given(start=minutes, end=minutes, now=minutes)
def test_quiet_hours_match_a_minute_by_minute_reference(start: int, end: int, now: int) -> None:
    def clock(m: int) -> dt.time:
        return dt.time(m // 60, m % 60)

    quiet_minutes = set()
    m = start
    while m != end:  # walk the span forward, across midnight if it must
        quiet_minutes.add(m)
        m = (m + 1) % (24 * 60)
    at = dt.datetime(2026, 12, 4, now // 60, now % 60, 30, tzinfo=dt.UTC)
    assert in_quiet_hours(at, clock(start), clock(end), "UTC") == (now in quiet_minutes)
