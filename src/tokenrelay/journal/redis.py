"""Redis Streams journal: several tokenrelay instances share streams, cancels and leases.

Keys (``P`` is the prefix, ``ID`` a stream id)::

    P s:ID    Redis Stream, one entry per frame, entry id ``0-<seq>``, field ``f``
    P m:ID    hash: meta (JSON), finished (0/1), state, last_seq, n (frames), nbytes
    P l:ID    lease of the owning instance (SET PX lease_s), renewed by :meth:`hold`
    P index   sorted set of stream ids by creation time, for ``max_streams``
    P n:ID    pub/sub channel: "new frames up to seq" (published by append and finish)
    P cancel  pub/sub channel of cancel requests (payload: stream id)

Writes are Lua scripts, one round trip each whatever the number of frames (appends of
all streams made while one pipeline is out share the next one), and atomic:
bounds are checked before anything is written, and :meth:`RedisJournal.finish` writes
exactly one terminal frame even when two instances race (it renumbers the frame to
``last_seq + 1``, so a reader ending a dead owner's stream cannot collide with a late
append). Live streams carry a long TTL refreshed by appends and leases; finished ones
expire ``retention_s`` after their end.

Waiting readers never hold a Redis connection each: the journal's
:class:`~tokenrelay.journal.redis_notifier.Notifier` keeps a single pub/sub connection
subscribed to the channels of streams that local readers wait on, and one XRANGE per
announced batch serves every local reader of that stream (measured: 1,000 subscribers on
100 streams, 51,000 frames in about 4 s on one core, most of it redis-py's own CPU); frames
this process appends go straight to its own waiting readers, and reads of several streams
share one MULTI. A reader re-checks with XRANGE after a timeout or a reconnect, so a lost
notification costs latency, never frames.

Redis being down surfaces as :class:`~tokenrelay.errors.ServiceUnavailable` within the
short socket timeouts; redis-py reconnects by itself once Redis is back, and the
notifier rebuilds its subscription with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Collection
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from tokenrelay.config import JournalLimits
from tokenrelay.errors import (
    ConfigError,
    JournalFull,
    ServiceUnavailable,
    StreamClosed,
    StreamNotFound,
)
from tokenrelay.journal.base import Follower, Journal, ReadResult, StreamInfo
from tokenrelay.journal.redis_notifier import DOWN, Notifier, Range, seq_of, unavailable

# KEYS: index, meta, stream, lease
# ARGV: id, now_ms, max_streams, prefix, meta_json, live_ttl_ms, lease_ms, owner
_CREATE = """
local n = redis.call('ZCARD', KEYS[1])
local max = tonumber(ARGV[3])
if n >= max then
  local victim = nil
  for _, sid in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    local f = redis.call('HGET', ARGV[4] .. 'm:' .. sid, 'finished')
    if not f then
      redis.call('ZREM', KEYS[1], sid)
      n = n - 1
    elseif f == '1' and not victim then
      victim = sid
    end
  end
  if n >= max then
    if not victim then return 0 end
    redis.call('DEL', ARGV[4] .. 'm:' .. victim, ARGV[4] .. 's:' .. victim)
    redis.call('ZREM', KEYS[1], victim)
  end
end
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[2], 'meta', ARGV[5], 'finished', '0', 'state', '',
           'last_seq', 0, 'n', 0, 'nbytes', 0)
redis.call('PEXPIRE', KEYS[2], ARGV[6])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
redis.call('SET', KEYS[4], ARGV[8], 'PX', ARGV[7])
return 1
"""

# KEYS: meta, stream
# ARGV: max_events, max_bytes, live_ttl_ms, channel, seq1, frame1, seq2, frame2, ...
_APPEND = """
local st = redis.call('HMGET', KEYS[1], 'finished', 'n', 'nbytes', 'last_seq')
if not st[1] then return -1 end
if st[1] == '1' then return -2 end
if tonumber(ARGV[5]) <= tonumber(st[4]) then return 0 end
local n = tonumber(st[2])
local nbytes = tonumber(st[3])
local count = (#ARGV - 4) / 2
local size = 0
for i = 6, #ARGV, 2 do size = size + #ARGV[i] end
if n + count > tonumber(ARGV[1]) or nbytes + size > tonumber(ARGV[2]) then return -3 end
local seq
for i = 5, #ARGV, 2 do
  seq = ARGV[i]
  redis.call('XADD', KEYS[2], '0-' .. seq, 'f', ARGV[i + 1])
end
redis.call('HSET', KEYS[1], 'n', n + count, 'nbytes', nbytes + size, 'last_seq', seq)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[4], seq)
return n + count
"""
# (A first seq <= last_seq is a retried call whose first attempt went through: 0, no-op.)

# KEYS: meta, stream, lease
# ARGV: frame without its "id: N" line (starts with "\n"), state, retention_ms, channel
_FINISH = """
local st = redis.call('HMGET', KEYS[1], 'finished', 'last_seq', 'n', 'nbytes')
if not st[1] then return -1 end
if st[1] == '1' then return 0 end
local seq = tonumber(st[2]) + 1
local frame = 'id: ' .. seq .. ARGV[1]
redis.call('XADD', KEYS[2], '0-' .. seq, 'f', frame)
redis.call('HSET', KEYS[1], 'finished', '1', 'state', ARGV[2], 'last_seq', seq,
           'n', tonumber(st[3]) + 1, 'nbytes', tonumber(st[4]) + #frame)
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('DEL', KEYS[3])
redis.call('PUBLISH', ARGV[4], -seq)
return seq
"""

# KEYS: lease1, meta1, stream1, lease2, ... ; ARGV: owner, lease_ms, live_ttl_ms
_HOLD = """
for i = 1, #KEYS, 3 do
  if redis.call('HGET', KEYS[i + 1], 'finished') == '0' then
    redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
    redis.call('PEXPIRE', KEYS[i + 1], ARGV[3])
    redis.call('PEXPIRE', KEYS[i + 2], ARGV[3])
  end
end
return 1
"""


def _append_error(exc: Exception) -> Exception:
    """A failed append inside a pipeline, as the error a single call would raise."""
    if isinstance(exc, DOWN):
        return ServiceUnavailable("redis unavailable")
    return exc


def _split_url(url: str) -> tuple[str, dict[str, str]]:
    """Take our own options (``prefix``, ``lease_s``) out of the URL's query string.

    redis-py passes unknown query arguments to its connections, which reject them; this
    lets one ``TOKENRELAY_REDIS_URL`` carry a key prefix per deployment (or per test).
    """
    parts = urlsplit(url)
    ours = {"prefix", "lease_s"}
    query = parse_qsl(parts.query, keep_blank_values=True)
    options = {k: v for k, v in query if k in ours}
    rest = urlencode([(k, v) for k, v in query if k not in ours])
    return urlunsplit(parts._replace(query=rest)), options


class RedisJournal(Journal):
    """Journal in Redis Streams, shared by every instance pointing at the same Redis.

    ``url`` may carry ``?prefix=...`` and ``?lease_s=...``; explicit keyword arguments
    win. ``instance_id`` is only written into leases (for debugging with redis-cli).
    """

    distributed = True

    def __init__(
        self,
        url: str,
        limits: JournalLimits | None = None,
        *,
        prefix: str | None = None,
        instance_id: str | None = None,
        lease_s: float | None = None,
        live_ttl_s: float | None = None,
        connect_timeout_s: float = 1.0,
        socket_timeout_s: float = 2.0,
        max_connections: int = 64,
        pool_timeout_s: float = 10.0,
    ) -> None:
        self.limits = limits or JournalLimits()
        redis_url, options = _split_url(url)
        self.prefix = prefix if prefix is not None else options.get("prefix", "tokenrelay:")
        try:
            self.lease_s = float(lease_s if lease_s is not None else options.get("lease_s", 5.0))
        except ValueError:
            raise ConfigError(
                f"redis url: lease_s={options['lease_s']!r} is not a number"
            ) from None
        self.instance_id = instance_id or "i-" + secrets.token_urlsafe(8)
        live = live_ttl_s if live_ttl_s is not None else self.limits.retention_s + 3600.0
        self._live_ms = max(1, int(live * 1000))
        self._retention_ms = max(1, int(self.limits.retention_s * 1000))
        self._lease_ms = max(1, int(self.lease_s * 1000))
        # A bounded pool: many readers woken at once queue for a connection instead of
        # opening one each. One quick retry covers a connection Redis closed meanwhile
        # (a restart); only connection errors are retried, before the command ran.
        pool = aioredis.BlockingConnectionPool.from_url(
            redis_url,
            max_connections=max_connections,
            timeout=pool_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            socket_timeout=socket_timeout_s,
            retry=Retry(
                ExponentialBackoff(cap=0.1, base=0.02), 1, supported_errors=(RedisConnectionError,)
            ),
        )
        self._redis = aioredis.Redis(connection_pool=pool)
        self._create = self._redis.register_script(_CREATE)
        self._append = self._redis.register_script(_APPEND)
        self._appends: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []
        self._appender: asyncio.Task[None] | None = None
        self.append_round_trips = 0  # pipelines sent by append (a test reads it)
        self._fetches: list[tuple[str, int, int, asyncio.Future[Range]]] = []
        self._fetcher: asyncio.Task[None] | None = None
        self.fetch_round_trips = 0  # MULTIs sent by reads (a test reads it)
        self._finish = self._redis.register_script(_FINISH)
        self._hold = self._redis.register_script(_HOLD)
        self._notifier = Notifier(self._redis, self._fetch_range)
        self._cancel_channel = (self.prefix + "cancel").encode()

    # -- keys ----------------------------------------------------------------------------

    def _stream(self, stream_id: str) -> str:
        return self.prefix + "s:" + stream_id

    def _meta(self, stream_id: str) -> str:
        return self.prefix + "m:" + stream_id

    def _lease(self, stream_id: str) -> str:
        return self.prefix + "l:" + stream_id

    def _channel(self, stream_id: str) -> bytes:
        return (self.prefix + "n:" + stream_id).encode()

    # -- writes --------------------------------------------------------------------------

    async def create(self, stream_id: str, meta: dict[str, Any]) -> None:
        keys = [
            self.prefix + "index",
            self._meta(stream_id),
            self._stream(stream_id),
            self._lease(stream_id),
        ]
        args: list[bytes | str | float] = [
            stream_id,
            int(time.time() * 1000),
            self.limits.max_streams,
            self.prefix,
            orjson.dumps(meta),
            self._live_ms,
            self._lease_ms,
            self.instance_id,
        ]
        with unavailable():
            created = await self._create(keys=keys, args=args)
        if not created:
            raise JournalFull(
                f"too many live streams (journal max_streams={self.limits.max_streams})"
            )

    async def append(self, stream_id: str, frames: list[bytes]) -> None:
        if not frames:
            return
        limits = self.limits
        args: list[Any] = [
            limits.max_events,
            limits.max_bytes,
            self._live_ms,
            self._channel(stream_id),
        ]
        for f in frames:
            args.append(seq_of(f))
            args.append(f)
        # Coalesced with the appends of other streams made meanwhile (see _send_appends).
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._appends.append(([self._meta(stream_id), self._stream(stream_id)], args, fut))
        if self._appender is None or self._appender.done():
            self._appender = asyncio.get_running_loop().create_task(self._send_appends())
        result = await fut
        if result >= 0:
            if result > 0:  # 0: a retried append that had gone through (nothing new)
                self._notifier.appended(self._channel(stream_id), frames)
            return
        if result == -1:
            raise StreamNotFound("no such stream (unknown or expired)")
        if result == -2:
            raise StreamClosed("the stream has already finished")
        raise JournalFull(
            f"stream exceeds the journal bound ({limits.max_events} events, "
            f"{limits.max_bytes} bytes)"
        )

    async def _send_appends(self) -> None:
        """Send every pending append in one pipeline, until none is left.

        One Lua call per token per stream, each its own round trip, cost about 270 µs of
        CPU per token in redis-py (100 streams of 50 tok/s filled a core); the appends of
        all streams that arrived while the previous pipeline was out share one. Each
        stream has at most one append in flight, so its frames stay in order.
        """
        while self._appends:
            batch, self._appends = self._appends, []
            self.append_round_trips += 1
            try:
                results = await self._append_pipeline(batch)
            except BaseException as exc:
                error = exc if isinstance(exc, Exception) else ServiceUnavailable(
                    "redis append interrupted")
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(error)
                if not isinstance(exc, Exception):
                    raise
                continue
            for (_, _, fut), result in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if isinstance(result, Exception):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)

    async def _append_pipeline(self, batch: list[tuple[list[str], list[Any], Any]]) -> list[Any]:
        for attempt in (1, 2):
            pipe = self._redis.pipeline(transaction=False)
            for keys, args, _ in batch:
                pipe.evalsha(self._append.sha, len(keys), *keys, *args)
            with unavailable():
                results = await pipe.execute(raise_on_error=False)
            if attempt == 1 and any(isinstance(r, NoScriptError) for r in results):
                # Redis restarted or flushed its scripts: load and send again (a retried
                # append whose first try went through is a no-op, see _APPEND).
                with unavailable():
                    await self._redis.script_load(_APPEND)
                continue
            return [_append_error(r) if isinstance(r, Exception) else r for r in results]
        raise AssertionError("unreachable")

    async def finish(self, stream_id: str, frame: bytes, state: str) -> bool:
        keys = [self._meta(stream_id), self._stream(stream_id), self._lease(stream_id)]
        tail = frame[frame.index(b"\n") :]
        args: list[bytes | str | float] = [tail, state, self._retention_ms,
                                           self._channel(stream_id)]
        with unavailable():
            result = await self._finish(keys=keys, args=args)
        if result == -1:
            raise StreamNotFound("no such stream (unknown or expired)")
        return bool(result > 0)

    # -- reads ---------------------------------------------------------------------------

    async def _fetch_range(self, stream_id: str, after: int, limit: int) -> Range:
        """Frames after ``after`` and the stream's state, read atomically.

        Coalesced like appends: the reads of every stream asked for while the previous
        MULTI was out go in one (one XRANGE + HMGET each), not a round trip per stream
        per token.
        """
        fut: asyncio.Future[Range] = asyncio.get_running_loop().create_future()
        self._fetches.append((stream_id, after, limit, fut))
        if self._fetcher is None or self._fetcher.done():
            self._fetcher = asyncio.get_running_loop().create_task(self._send_fetches())
        return await fut

    async def _send_fetches(self) -> None:
        while self._fetches:
            batch, self._fetches = self._fetches, []
            self.fetch_round_trips += 1
            pipe = self._redis.pipeline(transaction=True)
            for stream_id, after, limit, _ in batch:
                pipe.xrange(self._stream(stream_id), min=f"0-{after + 1}", max="+", count=limit)
                pipe.hmget(self._meta(stream_id), "finished", "state", "last_seq")
            try:
                with unavailable():
                    replies = await pipe.execute()
            except BaseException as exc:
                error = exc if isinstance(exc, Exception) else ServiceUnavailable(
                    "redis read interrupted")
                for *_, fut in batch:
                    if not fut.done():
                        fut.set_exception(error)
                if not isinstance(exc, Exception):
                    raise
                continue
            for i, (*_, fut) in enumerate(batch):
                if not fut.done():
                    entries, (finished, state, last_seq) = replies[2 * i], replies[2 * i + 1]
                    if finished is None:
                        fut.set_exception(StreamNotFound("no such stream (unknown or expired)"))
                        continue
                    frames = [fields[b"f"] for _, fields in entries]
                    if finished != b"1":
                        fut.set_result(Range(frames, False, None, int(last_seq)))
                    else:
                        fut.set_result(Range(frames, True, state.decode(), int(last_seq)))

    async def _range(self, stream_id: str, after: int, limit: int) -> ReadResult:
        return (await self._fetch_range(stream_id, after, limit)).cut(after, after, limit)

    async def read(
        self,
        stream_id: str,
        after: int,
        timeout: float,
        limit: int = 2048,
        follower: Follower | None = None,  # frames arrive by fetch here: no push
    ) -> ReadResult:
        after = max(0, after)
        if timeout <= 0:
            return await self._range(stream_id, after, limit)
        notifier = self._notifier
        channel = self._channel(stream_id)
        deadline = time.monotonic() + timeout
        fut: asyncio.Future[ReadResult | None] | None = None
        try:
            if notifier.confirmed(channel):
                # The usual case while tailing: this process's readers of the stream
                # share one XRANGE per batch (or wait for the next announcement).
                fut = notifier.register(channel, stream_id, after, limit)
                notifier.kick(channel, after)
            else:
                result = await self._range(stream_id, after, limit)
                if result.frames or result.finished:
                    return result
                fut = notifier.register(channel, stream_id, after, limit)
                if not await notifier.until_confirmed(channel, timeout):
                    return await self._range(stream_id, after, limit)
                # Subscribed only now: something may have been appended meanwhile.
                notifier.kick(channel, after, force=True)
            remaining = deadline - time.monotonic()
            if remaining > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(remaining):
                        delivered = await fut
                        if delivered is not None:
                            return delivered
            # Timed out (or told to re-check): a notification may have been lost.
            return await self._range(stream_id, after, limit)
        finally:
            if fut is not None:
                notifier.unregister(channel, fut)

    async def info(self, stream_id: str) -> StreamInfo | None:
        with unavailable():
            # bytes, not str: the client does not decode responses.
            data = cast("dict[bytes, bytes]", await self._redis.hgetall(self._meta(stream_id)))
        if not data:
            return None
        finished = data.get(b"finished") == b"1"
        return StreamInfo(
            stream_id,
            orjson.loads(data.get(b"meta", b"{}")),
            finished,
            data.get(b"state", b"").decode() or None if finished else None,
            int(data.get(b"last_seq", 0)),
        )

    async def delete(self, stream_id: str) -> bool:
        pipe = self._redis.pipeline(transaction=True)
        pipe.delete(self._meta(stream_id))
        pipe.delete(self._stream(stream_id), self._lease(stream_id))
        pipe.zrem(self.prefix + "index", stream_id)
        with unavailable():
            removed, _, _ = await pipe.execute()
        return bool(removed)

    # -- cluster: cancel and leases ------------------------------------------------------

    async def request_cancel(self, stream_id: str) -> None:
        with unavailable():
            await self._redis.publish(self._cancel_channel, stream_id)

    async def cancel_requests(self) -> AsyncIterator[str]:
        """Runs until closed; raises ServiceUnavailable when Redis goes away (retry it)."""
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            with unavailable():
                await pubsub.subscribe(self._cancel_channel)
            while True:
                with unavailable():
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                if msg is not None and msg["type"] == "message":
                    yield msg["data"].decode()
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def hold(self, stream_ids: Collection[str]) -> None:
        if not stream_ids:
            return
        keys: list[str] = []
        for sid in stream_ids:
            keys += (self._lease(sid), self._meta(sid), self._stream(sid))
        with unavailable():
            await self._hold(keys=keys, args=[self.instance_id, self._lease_ms, self._live_ms])

    async def owner_alive(self, stream_id: str) -> bool:
        pipe = self._redis.pipeline(transaction=False)
        pipe.hget(self._meta(stream_id), "finished")
        pipe.exists(self._lease(stream_id))
        with unavailable():
            finished, leased = await pipe.execute()
        return not (finished == b"0" and not leased)

    async def aclose(self) -> None:
        await self._notifier.aclose()
        with contextlib.suppress(Exception):
            await self._redis.aclose(close_connection_pool=True)
