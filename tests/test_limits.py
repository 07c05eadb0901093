"""Per-key limits: one contract run on the memory and the Redis backend, then over HTTP."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from support.client import chat_body, read_stream
from tokenrelay.config import RateLimits, Settings
from tokenrelay.errors import RateLimited
from tokenrelay.limits import (
    Limiter,
    MemoryLimiter,
    NoLimits,
    RedisLimiter,
    open_limiter,
)

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(params=["memory", "redis"])
async def make_limiter(request) -> AsyncIterator[Callable[..., Limiter]]:
    """``make_limiter(rpm=..)`` builds limiters of one backend; Redis ones share a fresh
    prefix (like instances of one cluster) whose keys are deleted afterwards."""
    prefix = f"tokenrelay-test-{uuid.uuid4().hex[:12]}:"
    made: list[Limiter] = []

    def make(**limits: float) -> Limiter:
        config = RateLimits(**limits)  # type: ignore[arg-type]
        limiter: Limiter = (
            MemoryLimiter(config) if request.param == "memory"
            else RedisLimiter(REDIS_URL, config, prefix)
        )
        made.append(limiter)
        return limiter

    make.backend = request.param  # type: ignore[attr-defined]
    make.prefix = prefix  # type: ignore[attr-defined]
    yield make
    for limiter in made:
        await limiter.aclose()
    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def test_a_burst_beyond_requests_per_minute_is_refused_with_retry_after(make_limiter):
    limiter = make_limiter(requests_per_minute=3)
    for _ in range(3):
        await limiter.acquire("alice")
    with pytest.raises(RateLimited) as caught:
        await limiter.acquire("alice")
    assert caught.value.limit == "requests_per_minute"
    assert caught.value.status == 429
    # one request refills every 20 s; Retry-After is whole seconds, rounded up
    assert 1 <= caught.value.retry_after <= 20
    assert caught.value.retry_after == int(caught.value.retry_after)
    assert "3 per minute" in caught.value.message
    await limiter.acquire("bob")  # another key has its own bucket


async def test_the_bucket_refills_over_time(make_limiter):
    limiter = make_limiter(requests_per_minute=600)  # one every 100 ms after the burst
    admitted = 0
    while True:  # refills while the loop runs, so count until the first refusal
        try:
            await limiter.acquire("alice")
        except RateLimited as exc:
            retry_after = exc.retry_after
            break
        admitted += 1
        assert admitted < 1200
    assert admitted >= 600 and retry_after == 1
    await asyncio.sleep(0.15)  # the passing of time is what is under test here
    await limiter.acquire("alice")


async def test_refusals_cost_nothing(make_limiter):
    limiter = make_limiter(requests_per_minute=2, concurrent_streams=1)
    lease = await limiter.acquire("alice")
    with pytest.raises(RateLimited) as caught:
        await limiter.acquire("alice")
    assert caught.value.limit == "concurrent_streams"
    await lease.finish()
    await limiter.acquire("alice")  # the refused call did not spend the second request
    with pytest.raises(RateLimited) as caught:
        await limiter.acquire("alice")
    assert caught.value.limit in ("requests_per_minute", "concurrent_streams")


async def test_concurrency_cap_is_freed_when_a_lease_finishes(make_limiter):
    limiter = make_limiter(concurrent_streams=2)
    first = await limiter.acquire("alice")
    await limiter.acquire("alice")
    with pytest.raises(RateLimited) as caught:
        await limiter.acquire("alice")
    assert caught.value.limit == "concurrent_streams" and caught.value.retry_after >= 1
    await first.finish()
    await first.finish()  # twice is harmless and frees nothing more
    await limiter.acquire("alice")
    with pytest.raises(RateLimited):
        await limiter.acquire("alice")


async def test_a_lease_of_a_dead_instance_expires(make_limiter):
    limiter = make_limiter(concurrent_streams=1, stream_lease_s=0.05)
    await limiter.acquire("alice")  # never finished, as if its instance died
    with pytest.raises(RateLimited):
        await limiter.acquire("alice")
    await asyncio.sleep(0.1)
    await limiter.acquire("alice")


async def test_tokens_per_minute_are_charged_when_an_answer_finishes(make_limiter):
    limiter = make_limiter(tokens_per_minute=100)
    lease = await limiter.acquire("alice")
    await limiter.acquire("alice")  # the budget is only checked, not spent, at admission
    await lease.finish(completion_tokens=250)  # an answer is never cut: the bucket owes 150
    with pytest.raises(RateLimited) as caught:
        await limiter.acquire("alice")
    assert caught.value.limit == "tokens_per_minute"
    assert 60 <= caught.value.retry_after <= 92  # 151 tokens at 100 per minute
    await limiter.acquire("bob")


async def test_instances_sharing_redis_share_one_budget(make_limiter):
    if make_limiter.backend != "redis":
        first = make_limiter(requests_per_minute=2)
        second = make_limiter(requests_per_minute=2)
        await first.acquire("alice")
        await first.acquire("alice")
        await second.acquire("alice")  # memory limiters are per process
        return
    first = make_limiter(requests_per_minute=2, concurrent_streams=5)
    second = make_limiter(requests_per_minute=2, concurrent_streams=5)
    await first.acquire("alice")
    await second.acquire("alice")
    with pytest.raises(RateLimited):
        await first.acquire("alice")
    with pytest.raises(RateLimited):
        await second.acquire("alice")


async def test_every_redis_key_has_an_expiry(make_limiter):
    if make_limiter.backend != "redis":
        return
    limiter = make_limiter(requests_per_minute=10, concurrent_streams=3, tokens_per_minute=50)
    lease = await limiter.acquire("alice")
    await limiter.acquire("alice")
    await lease.finish(completion_tokens=80)
    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=make_limiter.prefix + "*")]
        assert len(keys) == 3
        for key in keys:
            assert key.decode().startswith(make_limiter.prefix + "rl:alice:")
            ttl = await client.ttl(key)
            assert 0 < ttl <= 3601, (key, ttl)
    finally:
        await client.aclose()


async def test_concurrent_acquires_never_exceed_the_cap(make_limiter):
    limiter = make_limiter(concurrent_streams=5)
    await limiter.acquire("warm-up")  # connect (and load the script) before the race
    results = await asyncio.gather(
        *(limiter.acquire("alice") for _ in range(20)), return_exceptions=True
    )
    admitted = [r for r in results if not isinstance(r, BaseException)]
    assert len(admitted) == 5
    assert all(isinstance(r, RateLimited) for r in results if r not in admitted)


async def test_open_limiter_picks_the_backend():
    assert isinstance(open_limiter(Settings()), NoLimits)
    limited = Settings(rate_limits=RateLimits(requests_per_minute=5))
    assert isinstance(open_limiter(limited), MemoryLimiter)
    shared = Settings(rate_limits=RateLimits(concurrent_streams=1), redis_url=REDIS_URL)
    limiter = open_limiter(shared)
    try:
        assert isinstance(limiter, RedisLimiter)
    finally:
        await limiter.aclose()
    none = NoLimits(RateLimits())
    for _ in range(100):
        await (await none.acquire("x")).finish(10**6)


# -- over HTTP ---------------------------------------------------------------------------

KEYS = "alice:alice-key-0123456789,bob:bob-key-0123456789"
ALICE = {"Authorization": "Bearer alice-key-0123456789"}
BOB = {"Authorization": "Bearer bob-key-0123456789"}


@pytest.fixture(params=["memory", "redis"])
async def limited_env(request) -> AsyncIterator[dict[str, str]]:
    """Gateway env for each limiter backend; the Redis prefix is private and cleaned up."""
    if request.param == "memory":
        yield {"TOKENRELAY_API_KEYS": KEYS}
        return
    prefix = f"tokenrelay-test-{uuid.uuid4().hex[:12]}:"
    yield {"TOKENRELAY_API_KEYS": KEYS, "TOKENRELAY_REDIS_URL": REDIS_URL,
           "TOKENRELAY_REDIS_PREFIX": prefix}
    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=prefix + "*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def test_a_burst_gets_429_with_retry_after_per_key(gateway_factory, limited_env, http):
    short = chat_body("burst", sim={"tokens": 3})
    async with gateway_factory(TOKENRELAY_RPM="3", **limited_env) as gw:
        for _ in range(3):
            async with http.post(gw.base_url + "/api/chat", json=short, headers=ALICE) as r:
                assert r.status == 200
                await read_stream(r)
        async with http.post(gw.base_url + "/api/chat", json=short, headers=ALICE) as r:
            assert r.status == 429
            retry_after = int(r.headers["Retry-After"])
            error = (await r.json())["error"]
        assert 1 <= retry_after <= 20
        assert error["code"] == "rate_limited" and error["limit"] == "requests_per_minute"
        assert error["retryable"] is True and error["message"]
        v1 = {**short, "stream": False}
        async with http.post(gw.base_url + "/v1/chat/completions", json=v1, headers=ALICE) as r:
            assert r.status == 429 and "Retry-After" in r.headers
            assert (await r.json())["error"]["limit"] == "requests_per_minute"
        async with http.post(gw.base_url + "/v1/chat/completions", json=v1, headers=BOB) as r:
            assert r.status == 200  # bob has a budget of his own
            assert (await r.json())["choices"][0]["message"]["content"]


async def test_concurrent_streams_cap_until_the_generation_finishes(
    gateway_factory, limited_env, http
):
    slow = chat_body("wait", sim={"first_token_delay_s": 30})
    async with gateway_factory(TOKENRELAY_MAX_CONCURRENT_STREAMS="1", **limited_env) as gw:
        async with http.post(gw.base_url + "/api/chat", json=slow, headers=ALICE) as first:
            assert first.status == 200
            stream_id = first.headers["X-Stream-Id"]
            task = gw.hub.generations[stream_id].task
            for path in ("/api/chat", "/v1/chat/completions"):
                async with http.post(gw.base_url + path, json=slow, headers=ALICE) as r:
                    assert r.status == 429
                    assert int(r.headers["Retry-After"]) >= 1
                    assert (await r.json())["error"]["limit"] == "concurrent_streams"
            cancel = f"{gw.base_url}/api/streams/{stream_id}/cancel"
            async with http.post(cancel, headers=ALICE) as r:
                assert r.status == 202
            await read_stream(first)
        await task  # the lease is released in the generation's on_finish
        short = chat_body("again", sim={"tokens": 2})
        async with http.post(gw.base_url + "/api/chat", json=short, headers=ALICE) as r:
            assert r.status == 200
            stream = await read_stream(r)
        assert stream.events[-1].data["state"] == "complete"


async def test_tokens_per_minute_counts_finished_answers(gateway_factory, http):
    async with gateway_factory(TOKENRELAY_TPM="5", TOKENRELAY_API_KEYS=KEYS) as gw:
        body = chat_body("count me", sim={"tokens": 20})
        async with http.post(gw.base_url + "/api/chat", json=body, headers=ALICE) as r:
            task = gw.hub.generations[r.headers["X-Stream-Id"]].task
            stream = await read_stream(r)
        await task
        assert stream.events[-1].data["usage"]["completion_tokens"] >= 6
        async with http.post(gw.base_url + "/api/chat", json=body, headers=ALICE) as r:
            assert r.status == 429
            assert (await r.json())["error"]["limit"] == "tokens_per_minute"
            assert int(r.headers["Retry-After"]) >= 12  # at least 1 token at 5 per minute


async def test_a_refused_request_starts_nothing_upstream(simulator, gateway_factory, http):
    sim, _ = simulator
    async with gateway_factory(TOKENRELAY_RPM="1") as gw:  # the local user is limited too
        body = chat_body("once", sim={"tokens": 2})
        async with http.post(gw.base_url + "/api/chat", json=body) as r:
            await read_stream(r)
        before = sim.stats.requests
        async with http.post(gw.base_url + "/api/chat", json=body,
                             headers={"Idempotency-Key": "k-1"}) as r:
            assert r.status == 429
        assert sim.stats.requests == before
        assert not gw.hub.generations
