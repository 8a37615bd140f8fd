"""The API's token cache: concurrent requests with one token share one verification."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import HTTPException

from ops_api.auth import Principal, TokenCache

OPERATOR = Principal("op", "operator", frozenset({"bandung"}))


class Verifier:
    """Stands in for the database lookup: takes `delay_s`, then answers `OPERATOR` or refuses; counts calls."""

    def __init__(self, delay_s: float, refuse: bool = False) -> None:
        self.delay_s, self.refuse, self.calls = delay_s, refuse, 0

    async def __call__(self) -> Principal:
        self.calls += 1
        await asyncio.sleep(self.delay_s)  # a database round trip, during which more requests arrive
        if self.refuse:
            raise HTTPException(401, "invalid or revoked token")
        return OPERATOR


async def test_concurrent_requests_share_one_verification_and_then_the_cache():
    cache, verify = TokenCache(ttl_s=60), Verifier(0.05)
    answers = await asyncio.gather(*(cache.verify_once("t", verify) for _ in range(50)))
    assert answers == [OPERATOR] * 50
    assert verify.calls == 1
    assert cache.get("t") == OPERATOR


async def test_a_refused_token_fails_every_waiter_and_is_asked_again_next_time():
    cache, refuse = TokenCache(ttl_s=60), Verifier(0.01, refuse=True)
    results = await asyncio.gather(*(cache.verify_once("bad", refuse) for _ in range(5)), return_exceptions=True)
    assert refuse.calls == 1
    assert all(isinstance(r, HTTPException) and r.status_code == 401 for r in results)
    assert cache.get("bad") is None
    with pytest.raises(HTTPException):
        await cache.verify_once("bad", refuse)
    assert refuse.calls == 2  # a failure is not cached: the next request asks again


async def test_when_the_verifying_request_is_cancelled_the_waiters_verify_for_themselves():
    cache, verify = TokenCache(ttl_s=60), Verifier(0.05)
    first = asyncio.create_task(cache.verify_once("t", verify))
    await asyncio.sleep(0.01)
    waiter = asyncio.create_task(cache.verify_once("t", verify))
    await asyncio.sleep(0.01)
    first.cancel()  # the client that started the lookup disconnected
    assert await waiter == OPERATOR
    assert verify.calls == 2


async def test_an_expired_entry_is_verified_again():
    cache = TokenCache(ttl_s=0)
    cache.put("t", OPERATOR)
    assert cache.get("t") is None
