"""Per-key limits: "may this key start a stream now, and if not, when?"

Three limits per tenant (see :class:`~tokenrelay.config.RateLimits`; 0 turns one off):

* ``requests_per_minute``: a token bucket holding up to that many requests, refilled
  evenly (a burst of N, then one every 60/N s);
* ``concurrent_streams``: generations open at once; a slot is a *lease* held until the
  generation finishes (:meth:`Lease.finish`), with an expiry so a slot held by a dead
  instance frees itself;
* ``tokens_per_minute``: completion tokens, charged when a generation finishes. The bucket
  may go into debt (an answer is not cut short); new streams wait until it is positive.

:meth:`Limiter.acquire` checks all three and commits only if all pass, so a refused
request costs nothing. A refusal is :class:`~tokenrelay.errors.RateLimited` naming the
limit, with ``retry_after`` in whole seconds (rounded up, so waiting that long is enough
for the rate limits; for the concurrency cap it is a hint).

Two backends behind one interface: :class:`MemoryLimiter` (one process, the default) and
:class:`RedisLimiter` (every instance shares one budget; one Lua script per call, so
check-and-commit is atomic, and every key it writes has an expiry). With no limit
configured :class:`NoLimits` costs one function call.
"""

from __future__ import annotations

import abc
import logging
import math
import secrets
import time
from dataclasses import dataclass
from typing import Any

from tokenrelay.config import RateLimits, Settings
from tokenrelay.errors import RateLimited, ServiceUnavailable

log = logging.getLogger("tokenrelay.limits")

RPM = "requests_per_minute"
CONCURRENT = "concurrent_streams"
TPM = "tokens_per_minute"
_CONCURRENT_RETRY_S = 1.0  # nobody knows when a stream ends; ask again soon
_MESSAGES = {
    RPM: "too many requests for this key (limit: {} per minute)",
    CONCURRENT: "too many open streams for this key (limit: {} at once)",
    TPM: "token budget of this key spent (limit: {} completion tokens per minute)",
}


def _refused(limit: str, retry_after: float, limits: RateLimits) -> RateLimited:
    value = getattr(limits, limit)
    return RateLimited(
        _MESSAGES[limit].format(value),
        retry_after=float(max(1, math.ceil(retry_after - 1e-9))),
        limit=limit,
    )


class Lease:
    """One admitted stream: :meth:`finish` frees its concurrency slot and charges its tokens.

    Finishing twice is harmless, so error paths may call it freely.
    """

    __slots__ = ("_done", "id", "limiter", "owner")

    def __init__(self, limiter: Limiter, owner: str, lease_id: str) -> None:
        self.limiter = limiter
        self.owner = owner
        self.id = lease_id
        self._done = False

    async def finish(self, completion_tokens: int = 0) -> None:
        if self._done:
            return
        self._done = True
        try:
            await self.limiter._finish(self.owner, self.id, max(0, int(completion_tokens)))
        except Exception as exc:  # the slot expires on its own; never fail an answer for it
            log.warning("releasing a rate-limit lease failed (%s)", type(exc).__name__)


class Limiter(abc.ABC):
    """Admission control per tenant (see module docstring)."""

    def __init__(self, limits: RateLimits) -> None:
        self.limits = limits

    @abc.abstractmethod
    async def acquire(self, owner: str) -> Lease:
        """Admit one stream for ``owner`` or raise RateLimited."""

    @abc.abstractmethod
    async def _finish(self, owner: str, lease_id: str, tokens: int) -> None:
        """Free the lease's slot and charge ``tokens``."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class NoLimits(Limiter):
    """No limit configured: admit everything, remember nothing."""

    async def acquire(self, owner: str) -> Lease:
        return Lease(self, owner, "")

    async def _finish(self, owner: str, lease_id: str, tokens: int) -> None:
        return None


@dataclass(slots=True)
class _Bucket:
    level: float
    stamp: float

    def refill(self, now: float, capacity: int) -> float:
        """Top up for the time since the last call; return the level."""
        self.level = min(capacity, self.level + (now - self.stamp) * capacity / 60.0)
        self.stamp = now
        return self.level


@dataclass(slots=True)
class _Tenant:
    rpm: _Bucket
    tpm: _Bucket
    leases: dict[str, float]  # lease id -> expiry (monotonic)


class MemoryLimiter(Limiter):
    """Limits in this process. One entry per tenant (tenants are configured keys)."""

    def __init__(self, limits: RateLimits, clock: Any = time.monotonic) -> None:
        super().__init__(limits)
        self._clock = clock
        self._tenants: dict[str, _Tenant] = {}

    def _tenant(self, owner: str, now: float) -> _Tenant:
        tenant = self._tenants.get(owner)
        if tenant is None:
            limits = self.limits
            tenant = _Tenant(
                _Bucket(limits.requests_per_minute, now),
                _Bucket(limits.tokens_per_minute, now),
                {},
            )
            self._tenants[owner] = tenant
        return tenant

    async def acquire(self, owner: str) -> Lease:
        limits = self.limits
        now = self._clock()
        tenant = self._tenant(owner, now)
        if limits.tokens_per_minute:
            level = tenant.tpm.refill(now, limits.tokens_per_minute)
            if level <= 0:
                raise _refused(TPM, (-level + 1) * 60.0 / limits.tokens_per_minute, limits)
        if limits.concurrent_streams:
            leases = tenant.leases
            for lease_id in [k for k, expiry in leases.items() if expiry <= now]:
                del leases[lease_id]
            if len(leases) >= limits.concurrent_streams:
                raise _refused(CONCURRENT, _CONCURRENT_RETRY_S, limits)
        if limits.requests_per_minute:
            level = tenant.rpm.refill(now, limits.requests_per_minute)
            if level < 1:
                raise _refused(RPM, (1 - level) * 60.0 / limits.requests_per_minute, limits)
            tenant.rpm.level = level - 1
        lease_id = secrets.token_hex(8)
        if limits.concurrent_streams:
            tenant.leases[lease_id] = now + limits.stream_lease_s
        return Lease(self, owner, lease_id)

    async def _finish(self, owner: str, lease_id: str, tokens: int) -> None:
        tenant = self._tenants.get(owner)
        if tenant is None:
            return
        tenant.leases.pop(lease_id, None)
        if tokens and self.limits.tokens_per_minute:
            tenant.tpm.refill(self._clock(), self.limits.tokens_per_minute)
            tenant.tpm.level -= tokens


# KEYS: rpm bucket, tpm bucket, lease set. ARGV: rpm, tpm, cap, lease id, lease seconds.
# Returns {admitted (0/1), limit, retry-after seconds as a string (Lua numbers -> ints)}.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rpm, tpm, cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local function level(key, capacity)
  local v = redis.call('HMGET', key, 'level', 'ts')
  local l, ts = tonumber(v[1]), tonumber(v[2])
  if l == nil or ts == nil then return capacity end
  return math.min(capacity, l + math.max(0, now - ts) * capacity / 60)
end
if tpm > 0 then
  local l = level(KEYS[2], tpm)
  if l <= 0 then return {0, 'tokens_per_minute', tostring((1 - l) * 60 / tpm)} end
end
if cap > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
  if redis.call('ZCARD', KEYS[3]) >= cap then return {0, 'concurrent_streams', '1'} end
end
if rpm > 0 then
  local l = level(KEYS[1], rpm)
  if l < 1 then return {0, 'requests_per_minute', tostring((1 - l) * 60 / rpm)} end
  redis.call('HSET', KEYS[1], 'level', tostring(l - 1), 'ts', tostring(now))
  redis.call('EXPIRE', KEYS[1], 61)
end
if cap > 0 then
  local lease = tonumber(ARGV[5])
  redis.call('ZADD', KEYS[3], now + lease, ARGV[4])
  redis.call('EXPIRE', KEYS[3], math.ceil(lease) + 1)
end
return {1, '', '0'}
"""

# KEYS: tpm bucket, lease set. ARGV: lease id, tokens, tpm.
_FINISH = """
redis.call('ZREM', KEYS[2], ARGV[1])
local tokens, tpm = tonumber(ARGV[2]), tonumber(ARGV[3])
if tokens > 0 and tpm > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  local v = redis.call('HMGET', KEYS[1], 'level', 'ts')
  local l, ts = tonumber(v[1]), tonumber(v[2])
  if l == nil or ts == nil then l, ts = tpm, now end
  l = math.min(tpm, l + math.max(0, now - ts) * tpm / 60) - tokens
  redis.call('HSET', KEYS[1], 'level', tostring(l), 'ts', tostring(now))
  -- the key lives until the bucket is full again, then it is the same as no key
  redis.call('EXPIRE', KEYS[1], math.ceil((tpm - l) * 60 / tpm) + 1)
end
return 1
"""


class RedisLimiter(Limiter):
    """Limits shared by every instance through Redis (see module docstring).

    Keys: ``{prefix}rl:{owner}:rpm|tpm|streams``, each with an expiry.
    """

    def __init__(self, url: str, limits: RateLimits, prefix: str = "tokenrelay:") -> None:
        super().__init__(limits)
        import redis.asyncio as redis

        self._redis = redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
        self.prefix = prefix + "rl:"
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._finish_script = self._redis.register_script(_FINISH)

    def keys(self, owner: str) -> list[str]:
        base = f"{self.prefix}{owner}:"
        return [base + "rpm", base + "tpm", base + "streams"]

    async def acquire(self, owner: str) -> Lease:
        limits = self.limits
        lease_id = secrets.token_hex(8)
        args: list[float | str] = [limits.requests_per_minute, limits.tokens_per_minute,
                                   limits.concurrent_streams, lease_id, limits.stream_lease_s]
        try:
            admitted, limit, retry_after = await self._acquire(keys=self.keys(owner), args=args)
        except Exception as exc:  # redis.ConnectionError, TimeoutError, OSError
            raise ServiceUnavailable("the rate limiter (redis) is unavailable") from exc
        if not int(admitted):
            name = limit.decode() if isinstance(limit, bytes) else str(limit)
            raise _refused(name, float(retry_after), limits)
        return Lease(self, owner, lease_id)

    async def _finish(self, owner: str, lease_id: str, tokens: int) -> None:
        _, tpm_key, streams_key = self.keys(owner)
        await self._finish_script(
            keys=[tpm_key, streams_key], args=[lease_id, tokens, self.limits.tokens_per_minute]
        )

    async def aclose(self) -> None:
        await self._redis.aclose()


def open_limiter(settings: Settings) -> Limiter:
    """The limiter the settings ask for: none, in memory, or Redis when ``redis_url`` is set."""
    limits = settings.rate_limits
    if not limits.enabled:
        return NoLimits(limits)
    if settings.redis_url:
        return RedisLimiter(settings.redis_url, limits, settings.redis_prefix)
    return MemoryLimiter(limits)
