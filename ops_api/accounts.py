"""Ops accounts, API tokens and the audit log.

A token reads `kota_<token_id>_<secret>`. The id finds the row; only SHA-256 of the secret is
stored, compared in constant time. Secrets are 256 random bits, so a slow password hash would buy
nothing and cost every request (GitHub and Stripe keep API tokens the same way).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any, Literal, get_args

import psycopg
from psycopg.types.json import Jsonb

from kota.contract import is_valid_id

Role = Literal["operator", "integrator", "admin"]
ROLES: tuple[str, ...] = get_args(Role)
TOKEN_PREFIX = "kota_"  # noqa: S105 - a format marker, not a secret
# A new token's lifetime unless asked otherwise (`kota users token NAME --expires DAYS|never`): a
# token left in a browser or a script stops working on its own.
DEFAULT_TOKEN_LIFETIME = dt.timedelta(days=90)
# In SQL: a token that works now.
LIVE_TOKEN = "t.revoked_at IS NULL AND (t.expires_at IS NULL OR t.expires_at > now())"  # noqa: S105


@dataclass(frozen=True, slots=True)
class User:
    user_id: str
    role: Role
    cities: tuple[str, ...]
    display_name: str | None = None

    def __post_init__(self) -> None:
        if not is_valid_id(self.user_id):
            raise ValueError(f"user id {self.user_id!r}: use 1-64 of a-z 0-9 - _ .")
        if self.role not in ROLES:
            raise ValueError(f"role {self.role!r}: one of {', '.join(ROLES)}")
        if self.role != "admin" and not self.cities:
            raise ValueError("an operator or integrator needs at least one city")
        for city in self.cities:
            if not is_valid_id(city):
                raise ValueError(f"city {city!r}: use 1-64 of a-z 0-9 - _ .")


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def split_token(token: str) -> tuple[str, str] | None:
    """(token_id, secret) of a well-formed token, else None."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    token_id, sep, secret = token[len(TOKEN_PREFIX) :].partition("_")
    return (token_id, secret) if sep and token_id and secret else None


def secret_matches(secret: str, stored_hash: bytes) -> bool:
    return hmac.compare_digest(hash_secret(secret), bytes(stored_hash))


def upsert_user(conn: psycopg.Connection, user: User, *, actor: str) -> None:
    conn.execute(
        "INSERT INTO users (user_id, display_name, role, cities) VALUES (%s, %s, %s, %s) "
        "ON CONFLICT (user_id) DO UPDATE SET display_name = excluded.display_name, role = excluded.role, "
        "cities = excluded.cities, enabled = true",
        (user.user_id, user.display_name, user.role, list(user.cities)),
    )
    record(conn, actor, "user.saved", "user", user.user_id, None, {"role": user.role, "cities": list(user.cities)})


def get_user(conn: psycopg.Connection, user_id: str) -> User | None:
    row = conn.execute(
        "SELECT user_id, role, cities, display_name FROM users WHERE user_id = %s", (user_id,)
    ).fetchone()
    return User(row[0], row[1], tuple(row[2]), row[3]) if row else None


@dataclass(frozen=True, slots=True)
class Tokens:
    """A user's live tokens (not revoked, not expired)."""

    live: int
    next_expiry: dt.datetime | None  # the soonest a live token expires
    never_expiring: int


def list_users(conn: psycopg.Connection) -> list[tuple[User, Tokens]]:
    """Every user with their live tokens."""
    rows = conn.execute(
        f"SELECT u.user_id, u.role, u.cities, u.display_name, count(t.token_id) FILTER (WHERE {LIVE_TOKEN}), "  # noqa: S608
        f"min(t.expires_at) FILTER (WHERE {LIVE_TOKEN}), "
        f"count(t.token_id) FILTER (WHERE {LIVE_TOKEN} AND t.expires_at IS NULL) "
        "FROM users u LEFT JOIN api_tokens t USING (user_id) GROUP BY u.user_id ORDER BY u.user_id"
    ).fetchall()
    return [(User(r[0], r[1], tuple(r[2]), r[3]), Tokens(r[4], r[5], r[6])) for r in rows]


def issue_token(
    conn: psycopg.Connection,
    user_id: str,
    *,
    label: str | None = None,
    actor: str,
    lifetime: dt.timedelta | None = DEFAULT_TOKEN_LIFETIME,
) -> str:
    """A new token for the user, working for `lifetime` (None: until revoked); shown once, never
    stored in clear."""
    if get_user(conn, user_id) is None:
        raise LookupError(f"user {user_id!r} not found")
    if lifetime is not None and lifetime <= dt.timedelta(0):
        raise ValueError("a token's lifetime must be positive")
    token_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32).replace("_", "-")
    cur = conn.execute(
        "INSERT INTO api_tokens (token_id, user_id, secret_hash, label, expires_at) "
        "VALUES (%s, %s, %s, %s, now() + %s::interval) RETURNING expires_at",
        (token_id, user_id, hash_secret(secret), label, lifetime),
    )
    expires_at = cur.fetchone()[0]  # type: ignore[index]
    record(
        conn,
        actor,
        "token.issued",
        "user",
        user_id,
        None,
        {"token_id": token_id, "label": label, "expires_at": expires_at.isoformat() if expires_at else None},
    )
    return f"{TOKEN_PREFIX}{token_id}_{secret}"


def token_expiry(conn: psycopg.Connection, token: str) -> dt.datetime | None:
    """When a token expires (None: never, or no such token)."""
    parts = split_token(token)
    row = (
        conn.execute("SELECT expires_at FROM api_tokens WHERE token_id = %s", (parts[0],)).fetchone() if parts else None
    )
    return row[0] if row else None


def revoke_tokens(conn: psycopg.Connection, user_id: str, *, actor: str) -> int:
    cur = conn.execute("UPDATE api_tokens SET revoked_at = now() WHERE user_id = %s AND revoked_at IS NULL", (user_id,))
    record(conn, actor, "token.revoked", "user", user_id, None, {"tokens": cur.rowcount})
    return cur.rowcount


def token_is_live(conn: psycopg.Connection, token: str) -> bool:
    parts = split_token(token)
    if parts is None:
        return False
    row = conn.execute(
        f"SELECT secret_hash FROM api_tokens t WHERE token_id = %s AND {LIVE_TOKEN}",  # noqa: S608
        (parts[0],),
    ).fetchone()
    return row is not None and secret_matches(parts[1], row[0])


AUDIT_INSERT = (
    "INSERT INTO audit_log (actor, action, target_type, target_id, city, details) VALUES (%s, %s, %s, %s, %s, %s)"
)


def record(
    conn: psycopg.Connection,
    actor: str,
    action: str,
    target_type: str,
    target_id: str,
    city: str | None,
    details: dict[str, Any] | None = None,
) -> None:
    """One audit entry, in the caller's transaction."""
    conn.execute(AUDIT_INSERT, (actor, action, target_type, target_id, city, Jsonb(details or {})))


async def record_async(
    conn: psycopg.AsyncConnection,
    actor: str,
    action: str,
    target_type: str,
    target_id: str,
    city: str | None,
    details: dict[str, Any] | None = None,
) -> None:
    await conn.execute(AUDIT_INSERT, (actor, action, target_type, target_id, city, Jsonb(details or {})))
