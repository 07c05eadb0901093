"""Idempotent send: one ``Idempotency-Key`` starts at most one billed generation.

``POST /api/chat`` with an ``Idempotency-Key`` header claims ``(owner, key)`` for a new
stream id. A repeat of the same key within the retention period attaches to that stream
(and replays it from the start) instead of starting a second generation; the same key with
a different request body is a 422, as reusing a key for another request is a client bug.

Claims are atomic: in memory for one process, ``SET NX`` in Redis for a cluster.
"""

from __future__ import annotations

import abc
import hashlib
import time
from collections import OrderedDict
from typing import Any, cast

import orjson

from tokenrelay.errors import BadRequest, ServiceUnavailable

MAX_KEY_LENGTH = 200


def fingerprint(body: Any) -> str:
    """A stable digest of a request body (keys sorted)."""
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


def check_key(key: str) -> str:
    key = key.strip()
    if not key or len(key) > MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
        raise BadRequest(
            f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable ASCII characters",
            code="invalid_idempotency_key",
        )
    return key


class IdempotencyStore(abc.ABC):
    """Remembers which stream an idempotency key started."""

    async def claim(self, owner: str, key: str, digest: str, stream_id: str) -> str | None:
        """Claim ``key`` for ``stream_id``; return the earlier stream id if already claimed.

        Raises BadRequest(422) when the key was used for a different request body.
        """
        earlier = await self._set_if_absent(f"{owner}\x00{key}", f"{stream_id} {digest}")
        if earlier is None:
            return None
        earlier_stream, _, earlier_digest = earlier.partition(" ")
        if earlier_digest != digest:
            raise BadRequest(
                "this Idempotency-Key was already used for a different request",
                code="idempotency_key_reused",
                status=422,
            )
        return earlier_stream

    @abc.abstractmethod
    async def _set_if_absent(self, name: str, value: str) -> str | None:
        """Store ``value`` unless ``name`` exists; return the existing value, or None."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""


class MemoryIdempotency(IdempotencyStore):
    """Bounded, expiring claims in this process."""

    def __init__(self, ttl_s: float, max_keys: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.max_keys = max_keys
        self._claims: OrderedDict[str, tuple[float, str]] = OrderedDict()

    async def _set_if_absent(self, name: str, value: str) -> str | None:
        now = time.monotonic()
        while self._claims:  # oldest first: drop the expired ones
            oldest = next(iter(self._claims.values()))
            if oldest[0] > now and len(self._claims) < self.max_keys:
                break
            self._claims.popitem(last=False)
        found = self._claims.get(name)
        if found is not None:
            return found[1]
        self._claims[name] = (now + self.ttl_s, value)
        return None


class RedisIdempotency(IdempotencyStore):
    """Claims shared by every instance through Redis ``SET NX EX``."""

    def __init__(self, url: str, ttl_s: float, prefix: str = "tokenrelay:") -> None:
        import redis.asyncio as redis

        self._redis = redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        self.ttl_s = ttl_s
        self.prefix = prefix + "idem:"

    async def _set_if_absent(self, name: str, value: str) -> str | None:
        key = self.prefix + hashlib.sha256(name.encode()).hexdigest()
        try:
            ok = await self._redis.set(key, value, nx=True, ex=max(1, int(self.ttl_s)))
            if ok:
                return None
            # bytes, not str: the client does not decode responses.
            existing = cast("bytes | None", await self._redis.get(key))
        except Exception as exc:  # redis.ConnectionError, TimeoutError, OSError
            raise ServiceUnavailable("redis unavailable") from exc
        return existing.decode() if existing is not None else None

    async def aclose(self) -> None:
        await self._redis.aclose()
