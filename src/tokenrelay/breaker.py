"""Circuit breakers, one per route (a provider and its upstream model).

A route whose requests failed ``failures`` times in a row, each time in a way its retries
could not fix (connect errors, 5xx, timeouts, a stream that broke before its first token;
never a 4xx or a 429), is **open**: it is skipped for ``cooldown_s``. Then it is
**half-open**: one request probes it (the others still skip it); the probe's success
closes the breaker, its failure opens it for another cooldown. A probe that never reports
(its client left, its instance died) frees the probe slot after one cooldown.

Two implementations behind one interface: in memory (one process), and Redis when
``redis_url`` is set, so every instance shares the state (Lua scripts; time from Redis's
``TIME``). If Redis fails, the breaker lets requests through: it must never be the reason
an answer fails.

``admit``/``peek`` return None (go) or the seconds until the route may be tried again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from tokenrelay.config import BreakerPolicy, ModelRoute, Settings

log = logging.getLogger("tokenrelay.breaker")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
GAUGE = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}
MAX_ROUTES = 1000  # routes remembered for /metrics and /api/config


def route_key(route: ModelRoute) -> str:
    """The breaker's name for a route: provider and upstream model."""
    return f"{route.provider}/{route.upstream_model}"


@dataclass(slots=True)
class _State:
    failures: int = 0
    open_until: float = 0.0  # 0: closed
    probe_until: float = 0.0  # a probe is in flight until then


def _state_name(open_until: float, now: float) -> str:
    if not open_until:
        return CLOSED
    return OPEN if now < open_until else HALF_OPEN


class Breakers:
    """The breakers of one app (memory). Subclassed for Redis."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._states: dict[str, _State] = {}
        self.last: dict[str, str] = {}  # route -> state name, as last seen (for /metrics)

    def policy(self, route: ModelRoute) -> BreakerPolicy:
        return self.settings.providers[route.provider].breaker

    async def admit(self, route: ModelRoute) -> float | None:
        """None: try the route (maybe as the half-open probe); else seconds to wait."""
        return await self._check(route, take_probe=True)

    async def peek(self, route: ModelRoute) -> float | None:
        """As :meth:`admit`, without taking the probe slot."""
        return await self._check(route, take_probe=False)

    async def record(self, route: ModelRoute, ok: bool) -> None:
        """One request's outcome on the route: success, or a failure retries could not fix."""
        policy = self.policy(route)
        if policy.failures <= 0:
            return
        key = route_key(route)
        if ok:
            self._states.pop(key, None)
            if key in self.last:  # only routes that had a state: names may be any string
                self.last[key] = CLOSED
            return
        _bound(self.last)
        state = self._states.setdefault(key, _State())
        state.failures += 1
        if state.failures >= policy.failures or state.open_until:
            state.open_until = time.monotonic() + policy.cooldown_s
            state.probe_until = 0.0
            log.warning("circuit breaker of route %s opened for %g s", key, policy.cooldown_s)
        self.last[key] = _state_name(state.open_until, time.monotonic())

    async def _check(self, route: ModelRoute, take_probe: bool) -> float | None:
        policy = self.policy(route)
        if policy.failures <= 0:
            return None
        key = route_key(route)
        state = self._states.get(key)
        now = time.monotonic()
        if state is None or not state.open_until:
            return None
        self.last[key] = _state_name(state.open_until, now)
        if now < state.open_until:
            return state.open_until - now
        if now < state.probe_until:
            return state.probe_until - now
        if take_probe:
            state.probe_until = now + policy.cooldown_s
        return None

    async def states(self) -> dict[str, dict[str, Any]]:
        """Every configured or seen route: state, consecutive failures, seconds to retry."""
        now = time.monotonic()
        out = {}
        for key in self._keys():
            state = self._states.get(key, _State())
            name = _state_name(state.open_until, now)
            self.last[key] = name
            out[key] = {"state": name, "failures": state.failures,
                        "retry_after": round(max(0.0, state.open_until - now), 3)}
        return out

    def _keys(self) -> list[str]:
        keys = {route_key(r) for r in self.settings.models.values()}
        return sorted(keys | set(self._states) | set(self.last))

    async def aclose(self) -> None:
        """Release connections (Redis)."""


_CHECK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
if open_until == 0 then return '' end
if now < open_until then return tostring(open_until - now) end
local probe = tonumber(redis.call('HGET', KEYS[1], 'probe_until') or '0')
if now < probe then return tostring(probe - now) end
if ARGV[1] == '1' then
  redis.call('HSET', KEYS[1], 'probe_until', tostring(now + tonumber(ARGV[2])))
end
return ''
"""
# ARGV: failures threshold, cooldown, key ttl.
_FAIL = """
local n = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
if n >= tonumber(ARGV[1]) or open_until > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  redis.call('HSET', KEYS[1], 'open_until', tostring(now + tonumber(ARGV[2])), 'probe_until', '0')
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return n
"""
_STATE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
for i, key in ipairs(KEYS) do
  local v = redis.call('HMGET', key, 'failures', 'open_until')
  out[i] = {v[1] or '0', v[2] or '0', tostring(now)}
end
return out
"""


class RedisBreakers(Breakers):
    """Breakers shared by every instance: ``{prefix}cb:{route}`` hashes."""

    def __init__(self, settings: Settings, url: str, prefix: str) -> None:
        super().__init__(settings)
        import redis.asyncio as redis

        self._redis = redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
        self.prefix = prefix + "cb:"
        self._check_script = self._redis.register_script(_CHECK)
        self._fail_script = self._redis.register_script(_FAIL)
        self._state_script = self._redis.register_script(_STATE)

    async def _check(self, route: ModelRoute, take_probe: bool) -> float | None:
        policy = self.policy(route)
        if policy.failures <= 0:
            return None
        key = route_key(route)
        try:
            wait = await self._check_script(
                keys=[self.prefix + key], args=["1" if take_probe else "0", policy.cooldown_s]
            )
        except Exception as exc:  # redis down: never the reason an answer fails
            log.warning("circuit breaker state unavailable (%s)", type(exc).__name__)
            return None
        wait = wait.decode() if isinstance(wait, bytes) else str(wait or "")
        self.last[key] = OPEN if wait else self.last.get(key, CLOSED)
        return float(wait) if wait else None

    async def record(self, route: ModelRoute, ok: bool) -> None:
        policy = self.policy(route)
        if policy.failures <= 0:
            return
        key = route_key(route)
        try:
            if ok:
                await self._redis.delete(self.prefix + key)
                if key in self.last:
                    self.last[key] = CLOSED
                return
            ttl = int(policy.cooldown_s * 10 + 3600)
            failures = await self._fail_script(
                keys=[self.prefix + key], args=[policy.failures, policy.cooldown_s, ttl]
            )
        except Exception as exc:
            log.warning("circuit breaker update failed (%s)", type(exc).__name__)
            return
        if int(failures) >= policy.failures:
            if self.last.get(key) != OPEN:
                log.warning("circuit breaker of route %s opened for %g s", key,
                            policy.cooldown_s)
            _bound(self.last)
            self.last[key] = OPEN

    async def states(self) -> dict[str, dict[str, Any]]:
        keys = self._keys()
        try:
            rows = await self._state_script(keys=[self.prefix + k for k in keys])
        except Exception as exc:
            log.warning("circuit breaker state unavailable (%s)", type(exc).__name__)
            return {k: {"state": self.last.get(k, CLOSED), "failures": None,
                        "retry_after": None} for k in keys}
        out = {}
        for key, (failures, open_until, now) in zip(keys, rows, strict=True):
            opened, at = float(open_until), float(now)
            name = _state_name(opened, at)
            self.last[key] = name
            out[key] = {"state": name, "failures": int(failures),
                        "retry_after": round(max(0.0, opened - at), 3)}
        return out

    async def aclose(self) -> None:
        await self._redis.aclose()


def _bound(last: dict[str, str]) -> None:
    """Forget closed routes once many are known: with a passthrough provider, route names
    are whatever clients ask for (and each is a /metrics series)."""
    if len(last) >= MAX_ROUTES:
        for key in [k for k, v in last.items() if v == CLOSED]:
            del last[key]


def open_breakers(settings: Settings) -> Breakers:
    """Redis-backed when ``redis_url`` is set, else in memory."""
    if settings.redis_url:
        return RedisBreakers(settings, settings.redis_url, settings.redis_prefix)
    return Breakers(settings)
