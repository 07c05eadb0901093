"""Circuit breakers (tokenrelay.breaker), in memory and in the shared Redis."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest

from support.redis_server import delete_prefix
from tokenrelay.breaker import CLOSED, HALF_OPEN, OPEN, Breakers, RedisBreakers, route_key
from tokenrelay.config import BreakerPolicy, ModelRoute, Provider, Settings

REDIS_URL = "redis://127.0.0.1:6379/0"
COOLDOWN = 0.3
ROUTE = ModelRoute("m", "p", "up-model")


def settings(failures: int = 3) -> Settings:
    provider = Provider("p", "http://127.0.0.1:1/v1",
                        breaker=BreakerPolicy(failures=failures, cooldown_s=COOLDOWN))
    return Settings(providers={"p": provider}, models={"m": ROUTE})


@pytest.fixture(params=["memory", "redis"])
async def make(request) -> AsyncIterator:
    """make(failures) -> Breakers; the Redis ones share one random key prefix."""
    prefix = f"test-i15-cb:{secrets.token_hex(6)}:"
    made: list[Breakers] = []

    def factory(failures: int = 3) -> Breakers:
        if request.param == "memory":
            breakers = Breakers(settings(failures))
        else:
            breakers = RedisBreakers(settings(failures), REDIS_URL, prefix)
        made.append(breakers)
        return breakers

    yield factory
    for breakers in made:
        await breakers.aclose()
    await delete_prefix(REDIS_URL, prefix)


async def state(breakers: Breakers) -> str:
    return (await breakers.states())[route_key(ROUTE)]["state"]


async def test_consecutive_failures_open_the_breaker_and_a_success_resets_the_count(make):
    breakers = make()
    for _ in range(2):
        await breakers.record(ROUTE, False)
    await breakers.record(ROUTE, True)  # not consecutive any more
    for _ in range(2):
        await breakers.record(ROUTE, False)
    assert await breakers.admit(ROUTE) is None and await state(breakers) == CLOSED
    await breakers.record(ROUTE, False)
    wait = await breakers.admit(ROUTE)
    assert wait is not None and 0 < wait <= COOLDOWN
    assert await state(breakers) == OPEN


async def test_after_the_cooldown_exactly_one_request_probes(make):
    breakers = make(failures=1)
    await breakers.record(ROUTE, False)
    await asyncio.sleep(COOLDOWN)
    assert await state(breakers) == HALF_OPEN
    assert await breakers.peek(ROUTE) is None  # a peek takes no probe slot
    assert await breakers.admit(ROUTE) is None  # the probe
    assert await breakers.admit(ROUTE) is not None  # the others still skip
    await breakers.record(ROUTE, True)
    assert await breakers.admit(ROUTE) is None and await state(breakers) == CLOSED


async def test_a_failed_probe_opens_it_for_another_cooldown(make):
    breakers = make(failures=2)
    for _ in range(2):
        await breakers.record(ROUTE, False)
    await asyncio.sleep(COOLDOWN)
    assert await breakers.admit(ROUTE) is None
    await breakers.record(ROUTE, False)  # one failure is enough while half-open
    assert await breakers.admit(ROUTE) is not None and await state(breakers) == OPEN


async def test_a_probe_that_never_reports_frees_its_slot_after_a_cooldown(make):
    breakers = make(failures=1)
    await breakers.record(ROUTE, False)
    await asyncio.sleep(COOLDOWN)
    assert await breakers.admit(ROUTE) is None
    await asyncio.sleep(COOLDOWN)
    assert await breakers.admit(ROUTE) is None


async def test_zero_failures_turns_the_breaker_off(make):
    breakers = make(failures=0)
    for _ in range(10):
        await breakers.record(ROUTE, False)
    assert await breakers.admit(ROUTE) is None and await state(breakers) == CLOSED


async def test_redis_breakers_share_their_state():
    prefix = f"test-i15-cb:{secrets.token_hex(6)}:"
    one = RedisBreakers(settings(failures=2), REDIS_URL, prefix)
    two = RedisBreakers(settings(failures=2), REDIS_URL, prefix)
    try:
        await shared(one, two)
    finally:
        await one.aclose()
        await two.aclose()
        await delete_prefix(REDIS_URL, prefix)


async def shared(one: Breakers, two: Breakers) -> None:
    await one.record(ROUTE, False)
    await two.record(ROUTE, False)  # consecutive across instances
    assert await one.admit(ROUTE) is not None and await two.admit(ROUTE) is not None
    await asyncio.sleep(COOLDOWN)
    assert await one.admit(ROUTE) is None  # one probe for the whole cluster
    assert await two.admit(ROUTE) is not None


async def test_an_unreachable_redis_lets_requests_through(refused_port):
    breakers = RedisBreakers(settings(failures=1), f"redis://127.0.0.1:{refused_port}/0", "x:")
    try:
        await breakers.record(ROUTE, False)
        assert await breakers.admit(ROUTE) is None
    finally:
        await breakers.aclose()
