"""The API's token cache: concurrent requests with one token share one verification."""

from __future__ import annotations

import asyncio

import pytest
from fastapi import HTTPException

from ops_api.auth import Principal, TokenCache

OPERATOR = Principal("op", "operator", frozenset({"bandung"}))


async def test_concurrent_requests_share_one_verification_and_then_the_cache():
    cache = TokenCache(ttl_s=60)
    calls = 0

    async def verify() -> Principal:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)  # a database round trip, during which 49 more requests arrive
        return OPERATOR

    answers = await asyncio.gather(*(cache.verify_once("t", verify) for _ in range(50)))
    assert answers == [OPERATOR] * 50
    assert calls == 1
    assert cache.get("t") == OPERATOR


async def test_a_refused_token_fails_every_waiter_and_is_asked_again_next_time():
    cache = TokenCache(ttl_s=60)
    calls = 0

    async def refuse() -> Principal:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        raise HTTPException(401, "invalid or revoked token")

    results = await asyncio.gather(*(cache.verify_once("bad", refuse) for _ in range(5)), return_exceptions=True)
    assert calls == 1
    assert all(isinstance(r, HTTPException) and r.status_code == 401 for r in results)
    assert cache.get("bad") is None
    with pytest.raises(HTTPException):
        await cache.verify_once("bad", refuse)
    assert calls == 2  # a failure is not cached: the next request asks again


async def test_an_expired_entry_is_verified_again():
    cache = TokenCache(ttl_s=0)
    cache.put("t", OPERATOR)
    assert cache.get("t") is None


async def test_when_the_verifying_request_is_cancelled_the_waiters_verify_for_themselves():
    cache = TokenCache(ttl_s=60)
    calls = 0

    async def verify() -> Principal:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return OPERATOR

    first = asyncio.create_task(cache.verify_once("t", verify))
    await asyncio.sleep(0.01)
    waiter = asyncio.create_task(cache.verify_once("t", verify))
    await asyncio.sleep(0.01)
    first.cancel()  # the client that started the lookup disconnected
    assert await waiter == OPERATOR
    assert calls == 2
