"""What the API and the notifier share about notifications: the key in the state's secrets folder,
channel secrets encrypted with it, the webhook signature, and the signed acknowledge links.

One secret file, `notifications.key`, gives two keys (HMAC-SHA256 of it with a label): a Fernet
key for channel secrets at rest and an HMAC key for acknowledge links. Neither ever reaches the
database.

Webhook signature (docs/notifications.md): the receiver gets `X-Kota-Timestamp` (Unix seconds)
and `X-Kota-Signature: v1=<hex HMAC-SHA256 of "<timestamp>.<raw body>" under the channel's secret>`.

Acknowledge token: `<payload>.<signature>`, both base64url without padding; the payload is
`<alert_id>:<subscription_id>:<expires unix s>:<nonce>`, the signature HMAC-SHA256 of the payload's
base64url text. The nonce makes it single use (notification_ack_uses).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass

from cryptography.fernet import Fernet, InvalidToken

from kota.settings import StackSettings, ensure_secret

KEY_FILE = "notifications.key"
SIGNATURE_VERSION = "v1"
TIMESTAMP_HEADER = "X-Kota-Timestamp"
SIGNATURE_HEADER = "X-Kota-Signature"
MAX_TOKEN_CHARS = 200
_PAYLOAD = re.compile(r"^([1-9][0-9]{0,18}):([1-9][0-9]{0,18}):([1-9][0-9]{0,11}):([A-Za-z0-9_-]{16,43})$")
_B64 = re.compile(r"^[A-Za-z0-9_-]+$")


class BadToken(ValueError):
    """An acknowledge token that is malformed, forged or expired."""


def _derive(secret: str, label: str) -> bytes:
    return hmac.new(secret.encode(), label.encode(), hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class NotificationKeys:
    """The two keys derived from the state's notifications secret."""

    secret: str

    @classmethod
    def from_stack(cls, stack: StackSettings) -> NotificationKeys:
        """KOTA_NOTIFICATIONS_KEY where set (compose, k8s: the API and the notifier are given the same
        one), else the state's secrets/notifications.key, made at first use (the local stack)."""
        if stack.notifications_key is not None:
            return cls(stack.notifications_key.get_secret_value())
        return cls(ensure_secret(stack.state_dir, KEY_FILE))

    @property
    def _fernet(self) -> Fernet:
        return Fernet(base64.urlsafe_b64encode(_derive(self.secret, "kota channel secrets")))

    @property
    def _ack_key(self) -> bytes:
        return _derive(self.secret, "kota acknowledge links")

    def encrypt(self, plain: str) -> bytes:
        return self._fernet.encrypt(plain.encode())

    def decrypt(self, token: bytes) -> str:
        try:
            return self._fernet.decrypt(bytes(token)).decode()
        except InvalidToken as exc:
            raise ValueError("channel secret does not decrypt with this state's notifications.key") from exc

    def ack_token(self, alert_id: int, subscription_id: int, expires_unix: int, nonce: str | None = None) -> str:
        """A signed, expiring, single-use acknowledge token for one alert, sent to one subscription."""
        nonce = nonce or secrets.token_urlsafe(16)
        payload = _b64(f"{alert_id}:{subscription_id}:{expires_unix}:{nonce}".encode())
        return f"{payload}.{_b64(hmac.new(self._ack_key, payload.encode(), hashlib.sha256).digest())}"

    def parse_ack_token(self, token: str, now_unix: float) -> AckToken:
        """The token's alert, subscription and nonce; BadToken when malformed, forged or expired."""
        if len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
            raise BadToken("malformed token")
        payload, signature = token.split(".")
        if not (_B64.match(payload) and _B64.match(signature)):
            raise BadToken("malformed token")
        expected = _b64(hmac.new(self._ack_key, payload.encode(), hashlib.sha256).digest())
        if not hmac.compare_digest(signature, expected):
            raise BadToken("bad signature")
        try:
            text = _unb64(payload).decode("ascii")
        except (binascii.Error, UnicodeDecodeError, ValueError) as exc:
            raise BadToken("malformed token") from exc
        match = _PAYLOAD.match(text)
        if match is None:
            raise BadToken("malformed token")
        token_ = AckToken(int(match[1]), int(match[2]), int(match[3]), match[4])
        if token_.expires_unix < now_unix:
            raise BadToken("link expired")
        return token_


@dataclass(frozen=True, slots=True)
class AckToken:
    alert_id: int
    subscription_id: int
    expires_unix: int
    nonce: str


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def webhook_signature(secret: str, timestamp: int, body: bytes) -> str:
    """The X-Kota-Signature value of a webhook body sent at `timestamp`."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"{SIGNATURE_VERSION}={digest}"


def verify_webhook(
    secret: str, timestamp_header: str, signature_header: str, body: bytes, now_unix: float, tolerance_s: int = 300
) -> bool:
    """What a receiver does: the timestamp is recent (no replays of old bodies) and the signature
    matches the body exactly as received."""
    if not timestamp_header.isascii() or not timestamp_header.isdigit() or len(timestamp_header) > 12:
        return False
    timestamp = int(timestamp_header)
    if abs(now_unix - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(
        signature_header.encode("utf-8", "surrogatepass"), webhook_signature(secret, timestamp, body).encode()
    )
