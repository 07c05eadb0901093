"""OpenAI-compatible upstream client: request, retries, fallbacks, time budgets, decoding.

One :class:`UpstreamCall` per answer. ``run(sink)`` awaits ``sink(events)`` with a list of
normalized events per network read (bulk parsing: a read of 50 tokens becomes a handful of
objects). A callback rather than an async generator: it runs once per read, and each
generator layer costs a resumption there.

Policy (DESIGN.md "Upstreams and models"):

* Before the first relayed event, connect errors, timeouts, 408/409/425/429/5xx, and
  streams that end before any token are retried with exponential backoff and full jitter,
  honouring ``Retry-After`` (seconds, HTTP date, or ``retry-after-ms``) capped by the
  policy. Each wait is announced through ``on_retry`` so subscribers see a ``retry`` event.
  When a model's attempts are spent (or the provider says it is overloaded), the next model
  of the fallback chain is tried. Other 4xx end the call at once.
* After the first relayed event nothing is ever retried: a drop, a corrupt chunk, an
  error the provider sends inside the stream, or a body that ends with neither ``[DONE]``
  nor a ``finish_reason`` raises, and the generation ends the stream with an ``error``
  event after the text already relayed. Whatever follows ``[DONE]`` (a stray line, a
  reset, silence) is ignored: the answer is complete.
* Three budgets: first token (from the request), idle (between reads once streaming) and
  total. A silent upstream raises :class:`UpstreamTimeout`, never hangs.

HTTP goes through :mod:`tokenrelay.httpclient` (a keep-alive pool made for streamed
answers); its errors never leave this module: :func:`_map_errors` turns each into the most
specific :class:`~tokenrelay.errors.UpstreamError`. Error messages are built from statuses
and the provider's own error text, redacted of every configured key.
"""

from __future__ import annotations

import asyncio
import email.utils
import html
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Protocol
from urllib.parse import urljoin

import orjson

from tokenrelay import timerwheel
from tokenrelay.bodydecoder import BodyDecoder
from tokenrelay.breaker import Breakers
from tokenrelay.chunks import completion_events
from tokenrelay.config import ModelRoute, Provider, Settings
from tokenrelay.contextwindow import is_context_overflow
from tokenrelay.errors import (
    ContextTooLong,
    UpstreamConnectError,
    UpstreamError,
    UpstreamIncomplete,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
    UpstreamUnavailable,
    redact,
)
from tokenrelay.events import Event, Finish, ReasoningDelta, TextDelta, Usage
from tokenrelay.httpclient import (
    BadResponse,
    ConnectFailed,
    Disconnected,
    HTTPError,
    Origin,
    Pool,
    Response,
    encode_head,
)

_ERROR_BODY_LIMIT = 64 * 1024
_MODELS_BODY_LIMIT = 4 << 20
_COMPLETION_BODY_LIMIT = 16 << 20  # a whole JSON answer to a stream request
_TEXT_LIMIT = 200  # characters of an HTML or text error page kept in a message
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = "tokenrelay"
_AFTER_DONE_S = 1.0  # how long the end of a body may take after [DONE]
MAX_CONTINUATIONS = 3  # cuts one answer may be continued after
log = logging.getLogger("tokenrelay.upstream")


@dataclass(slots=True)
class ContinueNotice:
    """A cut answer being continued by a route, announced as a ``continued`` event."""

    attempt: int  # the call's attempt number (1-based, across routes)
    model: str  # the model continuing
    reason: str  # the cut's error code, e.g. upstream_incomplete
    offset: int  # characters of answer text it continues after


@dataclass(slots=True)
class AttemptRecord:
    """One upstream request of an answer, for accounting (stored with the message)."""

    route: str
    provider: str
    upstream_model: str
    continuation: bool
    status: int | None  # HTTP status, None when no answer came
    outcome: str  # "ok", "cancelled", or an error code
    started_ms: float  # since the call began
    elapsed_ms: float
    relayed: bool
    content_chunks: int  # upstream chunks with text: the "counted" tokens
    usage: Usage | None  # what the provider reported for this request
    chars: int  # characters of text and reasoning relayed


def attempt_usage(attempt: AttemptRecord) -> tuple[int, str]:
    """Completion tokens of one attempt and their source: the provider's own count (an
    explicit zero included), else the chunks with text counted, else characters / 4."""
    if attempt.usage is not None:
        return attempt.usage.completion_tokens, "provider"
    if attempt.content_chunks:
        return attempt.content_chunks, "counted"
    if attempt.chars:
        return max(1, round(attempt.chars / 4)), "estimated"
    return 0, "counted"


@dataclass(slots=True)
class RetryNotice:
    """A wait before the next attempt, announced to subscribers as a ``retry`` event."""

    attempt: int  # the attempt that failed, 1-based, per model
    max_attempts: int
    wait_s: float
    reason: str  # an error code, e.g. upstream_rate_limited
    status: int | None
    model: str  # the model that failed
    next_model: str  # the model of the next attempt (differs on fallback)
    message: str


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms``, or ``Retry-After`` in seconds or HTTP date."""
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _error_message(body: bytes, status: int = 0, content_type: str = "") -> str:
    """The provider's own error message from a JSON, HTML or text error body, as one
    short line ("" when the body says nothing)."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        text = body.decode("utf-8", "replace")
        if "html" in content_type.lower() or re.match(r"\s*<(!doctype|html|head|body)", text,
                                                        re.IGNORECASE):
            text = _html_text(text)
        return _shorten(text)
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or err.get("msg")
            if isinstance(msg, str) and msg:
                return msg[:500]
        elif isinstance(err, str) and err:
            return err[:500]
    return ""


def _html_text(page: str) -> str:
    """An HTML page's title, or else its first text."""
    title = re.search(r"<title[^>]*>(.*?)</title>", page, re.IGNORECASE | re.DOTALL)
    if title and title.group(1).strip():
        return html.unescape(title.group(1))
    page = re.sub(r"(?is)<(script|style|head)\b.*?</\1\s*>|<!--.*?-->", " ", page)
    return html.unescape(re.sub(r"<[^>]*>", " ", page))


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _TEXT_LIMIT else text[: _TEXT_LIMIT - 1].rstrip() + "…"


def _status_words(status: int) -> str:
    try:
        return f"HTTP {status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"HTTP {status}"


def status_message(
    status: int, message: str, url: str, method: str, base_url: str,
    location: str = "", proxy: str = "",
) -> str:
    """One sentence for an upstream's error answer: what it said (never twice), and for
    the statuses a person must act on, what was asked and what to change."""
    said = _status_words(status)
    # "404 page not found" says the status again: keep only what it adds.
    message = message.strip().removeprefix(str(status)).lstrip(" :-").strip()
    words = message.rstrip(".").lower()
    if words and words not in said.lower():
        said = f"HTTP {status}: {message}"
    if status in _REDIRECTS:
        if not location:
            return f"upstream answered {said} to {method} {url}, without a Location"
        location = urljoin(url, location).split("?", 1)[0]  # relative ones too; no query
        target = location
        for tail in ("/chat/completions", "/models"):
            target = target.removesuffix(tail)
        return (f"upstream redirects {method} {url} to {location} "
                f"(HTTP {status}, not followed): set base_url to {target}")
    if status == 404:
        hint = ("the base URL may lack /v1 (try base_url = " f"{base_url}/v1)"
                if not re.search(r"/v\d", base_url) else "check the base URL and the model name")
        return f"upstream answered {said} for {method} {url}: {hint}"
    if status == 405:
        return (f"upstream answered {said} for {method} {url}: is the base URL an "
                "OpenAI-compatible API?")
    if status == 407 and proxy:
        return f"proxy {proxy} wants authentication ({said}): check the user:password in its URL"
    if status == 401:
        return f"upstream answered {said}: check the provider's API key"
    if status == 403:
        return f"upstream answered {said}: the API key may lack access to this model or endpoint"
    return f"upstream answered {said}"


def _error_param(body: bytes, redact: Callable[[str], str]) -> str | None:
    """The provider's ``error.param`` (the field it rejected), if its error body names one;
    upstream text, so redacted like its message."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    err = data.get("error") if isinstance(data, dict) else None
    param = err.get("param") if isinstance(err, dict) else None
    return redact(param[:200]) if isinstance(param, str) and param else None


@contextmanager
def _map_errors(phase: str, timeouts_for: Callable[[str], float]) -> Iterator[None]:
    """Translate HTTP client and asyncio failures into UpstreamError subclasses."""
    try:
        yield
    except UpstreamError:
        raise
    except TimeoutError:
        raise UpstreamTimeout(phase, timeouts_for(phase)) from None
    except Disconnected as exc:
        if exc.mid_body:
            raise UpstreamIncomplete(str(exc)) from None
        raise UpstreamConnectError(str(exc)) from None  # closed before any answer
    except BadResponse as exc:
        raise UpstreamProtocolError(str(exc)) from None
    except ConnectFailed as exc:  # TLS trust and proxy authentication cannot heal by waiting
        raise UpstreamConnectError(str(exc), retryable=exc.retryable) from None
    except (HTTPError, OSError) as exc:
        raise UpstreamConnectError(f"upstream connection failed ({type(exc).__name__})") from None


@dataclass(frozen=True, slots=True)
class _ChatTarget:
    """What every chat request to one provider sends alike, built once per provider."""

    provider: Provider  # the one it was built for (settings are frozen)
    origin: Origin | None  # None: the base URL is not a usable http(s) URL
    head: bytes  # request line and headers, without Content-Length
    problem: str = ""  # why origin is None


class UpstreamClient:
    """Holds the shared connection pool and resolves routes to providers."""

    def __init__(
        self,
        settings: Settings,
        pool: Pool,
        base_urls: Mapping[str, str] | None = None,
        breakers: Breakers | None = None,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.breakers = breakers if breakers is not None else Breakers(settings)
        self._base_urls = dict(base_urls or {})
        self._secrets = settings.secrets
        self._targets: dict[str, _ChatTarget] = {}

    def provider(self, route: ModelRoute) -> Provider:
        return self.settings.providers[route.provider]

    def base_url(self, provider: Provider) -> str:
        return self._base_urls.get(provider.name) or provider.base_url

    def _headers(self, provider: Provider, accept: str) -> dict[str, str]:
        headers = {
            "User-Agent": _USER_AGENT,
            "Accept": accept,
            "Accept-Encoding": "identity",  # a compressor would hold tokens back
        }
        headers.update(provider.headers)
        if provider.api_key:
            headers["Authorization"] = f"Bearer {provider.api_key}"
        return headers

    def _target(self, provider: Provider, method: str, path: str, accept: str,
                extra: Mapping[str, str]) -> _ChatTarget:
        try:
            origin = Origin.parse(self.base_url(provider), provider.proxy)
            head = encode_head(method, origin, path, {**self._headers(provider, accept), **extra})
        except ValueError as exc:
            # Never echo the header values: one of them carries the key.
            return _ChatTarget(provider, None, b"", self.redact(str(exc)))
        return _ChatTarget(provider, origin, head)

    def chat_target(self, provider: Provider) -> _ChatTarget:
        """Origin and encoded request head of ``provider``'s chat requests, built once
        (settings are frozen)."""
        target = self._targets.get(provider.name)
        if target is not None and target.provider is provider:
            return target
        target = self._target(provider, "POST", "/chat/completions", "text/event-stream",
                              {"Content-Type": "application/json"})
        self._targets[provider.name] = target
        return target

    async def status_error(self, target: _ChatTarget, resp: Response, method: str,
                           path: str, timeout: float) -> UpstreamStatusError:
        """The error for a non-200 answer, its body read (bounded) for the provider's words."""
        body = b""
        if resp.status not in _REDIRECTS:
            async with asyncio.timeout(timeout):
                body = await resp.read_all(_ERROR_BODY_LIMIT)
        origin = target.origin
        assert origin is not None
        base = _base(target)
        message = status_message(
            resp.status, _error_message(body, resp.status, resp.headers.get("content-type", "")),
            base + path, method, base, resp.headers.get("location", ""),
            origin.proxy.display if origin.proxy is not None else "",
        )
        message = self.redact(message)
        if is_context_overflow(resp.status, body):  # routed to context_fallbacks (issue 15)
            return ContextTooLong(resp.status, message)
        return UpstreamStatusError(
            resp.status, message,
            retry_after=parse_retry_after(resp.headers),
            overloaded="overload" in message.lower(),
            param=_error_param(body, self.redact),
        )

    async def _send(self, target: _ChatTarget, body: bytes, connect: float,
                    idempotent: bool = False) -> Response:
        if target.origin is None:
            raise UpstreamConnectError(
                f"provider {target.provider.name!r}: {target.problem}", retryable=False
            )
        return await self.pool.request(target.origin, target.head, body, connect_timeout=connect,
                                       idempotent=idempotent)

    def call(
        self,
        route: ModelRoute,
        body: dict[str, Any],
        on_retry: Callable[[RetryNotice], Awaitable[None]] | None = None,
        on_accept: Callable[[ModelRoute], None] | None = None,
    ) -> UpstreamCall:
        return UpstreamCall(self, route, body, on_retry, on_accept)

    def redact(self, text: str) -> str:
        return redact(text, self._secrets)

    async def list_models(self, provider: Provider) -> list[dict[str, Any]]:
        """The provider's ``/models`` list (for passthrough setups)."""
        target = self._target(provider, "GET", "/models", "application/json", {})
        connect = provider.timeouts.connect
        with _map_errors("connect", lambda _: connect):
            async with asyncio.timeout(connect + 5):
                resp = await self._send(target, b"", connect, idempotent=True)  # a GET
                try:
                    if resp.status != 200:
                        raise await self.status_error(target, resp, "GET", "/models", connect)
                    raw = await resp.read_all(_MODELS_BODY_LIMIT)
                finally:
                    resp.release()
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamProtocolError("upstream /models is not JSON") from None
        items = data.get("data", []) if isinstance(data, dict) else []
        return [m for m in items if isinstance(m, dict) and isinstance(m.get("id"), str)]


class Sink(Protocol):
    """Where a streaming attempt's events go without a task: ``sink_now`` of
    :meth:`UpstreamCall.run`, implemented by ``Generation._append_now`` (a journal with
    ``sync_append``, the memory journal).

    Once the first token is relayed, ``_Relay.on_data`` (the connection's data callback,
    a :class:`~tokenrelay.httpclient.BodyReceiver`) calls it with the events that
    ``BodyDecoder.decode`` made of one event-loop iteration's bytes, never an empty list.
    It must not wait; what it raises is kept and the connection closed, so the task's
    pending ``read()`` fails and the task raises that. Up to the first token (that read
    included), without ``sink_now``, and for bytes the task's ``read()`` still returns (a
    compressed body's last ones), the same lists go to the awaited ``sink``
    (``Generation._append_batch``) from the task's read loop instead.
    """

    def __call__(self, events: list[Event], /) -> None: ...


class AnswerState(Protocol):
    """What a call asks of the answer it feeds (the generation), if it has one."""

    async def on_continue(self, notice: ContinueNotice) -> None:
        """Announce a continuation (before its first new text)."""

    def partial(self) -> tuple[str, bool]:
        """The answer text so far, and whether tool calls began."""

    def progress(self) -> tuple[Usage | None, int]:
        """The last usage seen and the characters (text and reasoning) relayed."""


class UpstreamCall:
    """One answer's upstream request: retries and fallbacks before the first token, and,
    where the model opts in, continuation of a cut answer (see :meth:`run`)."""

    # Slots: one call lives under every open stream.
    __slots__ = ("_before", "_began", "_continuing", "_deadline", "_started", "answer",
                 "attempts", "body", "client", "content_chunks", "http_status", "on_accept",
                 "on_retry",
                 "records", "relayed", "route", "route_used", "upstream_model")

    def __init__(
        self,
        client: UpstreamClient,
        route: ModelRoute,
        body: dict[str, Any],
        on_retry: Callable[[RetryNotice], Awaitable[None]] | None,
        on_accept: Callable[[ModelRoute], None] | None = None,
    ) -> None:
        self.client = client
        self.route = route
        self.body = body
        self.on_retry = on_retry
        # Told (with the route) when an attempt's response is 200: the request is accepted.
        self.on_accept = on_accept
        self.route_used: ModelRoute = route
        self.upstream_model: str | None = None  # what the provider says it ran
        self.attempts = 0
        self.content_chunks = 0  # upstream chunks that carried text (a token estimate)
        self.relayed = False  # the current attempt has handed events to the sink
        self.answer: AnswerState | None = None  # set by the generation
        self.records: list[AttemptRecord] = []
        self.http_status: int | None = None  # of the current attempt's response
        self._continuing: ContinueNotice | None = None
        self._before: tuple[Usage | None, int] = (None, 0)
        self._began = 0.0
        self._started = 0.0
        self._deadline = float("inf")  # monotonic: the whole call's total budget

    def _chain(self) -> list[ModelRoute]:
        chain = [self.route]
        for name in self.route.fallbacks:
            fallback = self.client.settings.route(name)
            if fallback is not None and fallback not in chain:
                chain.append(fallback)
        return chain

    def _context_chain(self, route: ModelRoute) -> list[ModelRoute]:
        """Where a "context too long" refusal of ``route`` goes: its context_fallbacks, else
        the requested model's."""
        names = route.context_fallbacks or self.route.context_fallbacks
        found = (self.client.settings.route(name) for name in names)
        return [r for r in found if r is not None]

    async def run(
        self,
        sink: Callable[[list[Event]], Awaitable[None]],
        sink_now: Sink | None = None,
    ) -> None:
        """Hand each read's events to ``sink``; raises UpstreamError when the answer
        cannot go on. A route is never restarted once ``sink`` has been called: a cut
        answer either ends with the error or (``continue_after_cut``) is continued from
        its exact text by a route that takes an assistant prefix.

        Routes are tried in the chain's order, each skipped while its circuit breaker is
        open; a route's retryable failures are retried within its policy, except that a
        first-token timeout moves on to the next route at once (``retry_on_timeout``
        opts out), and a "context too long" refusal goes to ``context_fallbacks``.

        With ``sink_now`` (a sink that never waits), once the first token is relayed the
        rest of the body is parsed and handed over straight from the connection's data
        callback: no task wake-up per read.

        The attempts loop is written out here rather than in a per-route method: this
        frame lies under every open stream (bench/memory_probe.py)."""
        chain = self._chain()
        self._started = time.monotonic()
        self._deadline = self._started + self.client.provider(self.route).timeouts.total
        breakers = self.client.breakers
        tried: list[ModelRoute] = []
        failure: UpstreamError | None = None
        skipped: float | None = None  # the soonest a skipped route may be tried again
        index = 0
        while index < len(chain):
            route = chain[index]
            index += 1
            if failure is not None and time.monotonic() >= self._deadline:
                raise failure  # the total budget is spent: no route is tried any more
            wait = await breakers.admit(route)
            if wait is not None:
                skipped = wait if skipped is None else min(skipped, wait)
                continue
            tried.append(route)
            nxt = await self._next_open(chain[index:])
            provider = self.client.provider(route)
            attempt = 0
            while True:  # the attempts on this route
                attempt += 1
                self._begin(route)
                try:
                    await self._attempt(route, provider, sink, sink_now)
                except BaseException as exc:
                    self._end(route, exc, None)
                    if not isinstance(exc, UpstreamError):
                        raise
                    if self.relayed:  # it answered, then broke: continue or end
                        await breakers.record(route, True)
                        await self._continue(exc, chain, route, sink, sink_now)
                        return
                    if isinstance(exc, ContextTooLong):
                        rest = [r for r in self._context_chain(route) if r not in tried]
                        if not rest:
                            raise
                        await self._announce(exc, 1, 1, 0.0, route, rest[0],
                                             "context_fallback")
                        chain, index = tried + rest, len(tried)
                        break
                    step = self._after_failure(exc, attempt, route, provider, nxt)
                    if step is None:  # nothing left to try
                        if exc.retryable:  # not a 4xx or a broken configuration
                            await _record_failure(breakers, route, exc)
                        raise
                    fall_back, wait = step
                    await self._announce(exc, attempt, provider.retry.max_attempts, wait,
                                         route, nxt if fall_back and nxt else route)
                    if wait > 0:
                        await asyncio.sleep(wait)
                    if fall_back:
                        await _record_failure(breakers, route, exc)
                        failure = exc
                        break
                    continue
                self._end(route, None, None)
                await breakers.record(route, True)
                return
        if failure is not None:
            raise failure
        names = ", ".join(r.name for r in chain)
        raise UpstreamUnavailable(
            f"every route of this model is paused after repeated failures ({names})",
            retry_after=skipped,
        )

    async def _next_open(self, rest: list[ModelRoute]) -> ModelRoute | None:
        """The next route that its breaker lets through (a route with none to fall back
        to is retried within its policy, as a single route is)."""
        for route in rest:
            if await self.client.breakers.peek(route) is None:
                return route
        return None

    def _after_failure(
        self,
        exc: UpstreamError,
        attempt: int,
        route: ModelRoute,
        provider: Provider,
        next_route: ModelRoute | None,
    ) -> tuple[bool, float] | None:
        """What follows a failed attempt, before any text: None to give up (raise), else
        (fall back to ``next_route`` rather than retry this route, seconds to wait)."""
        if not exc.retryable:
            return None
        policy = provider.retry
        last = next_route is None
        spent = attempt >= policy.max_attempts or time.monotonic() >= self._deadline
        if spent and last:
            return None
        overloaded = isinstance(exc, UpstreamStatusError) and exc.overloaded
        # A silent route is left at once for the next one (issue 15): retrying it is what
        # made a 30 s silence cost 92 s.
        if (not last and not route.retry_on_timeout and isinstance(exc, UpstreamTimeout)
                and exc.phase == "first_token"):
            return True, 0.0
        fall_back = not last and (spent or (overloaded and attempt >= 2))
        wait = self._wait(exc, attempt, policy)
        budget = self.client.provider(self.route).retry.budget
        elapsed = time.monotonic() - self._started
        if elapsed + wait > budget or time.monotonic() + wait >= self._deadline:
            if last:
                return None
            fall_back = True
        if fall_back:
            return True, min(wait, policy.base_delay)
        return False, wait

    def _begin(self, route: ModelRoute) -> None:
        """A new attempt on ``route``: count it, and note where the answer stood."""
        self.attempts += 1
        self.route_used = route
        self.relayed = False
        self.content_chunks = 0
        self.http_status = None
        answer = self.answer
        self._before = answer.progress() if answer is not None else (None, 0)
        self._began = time.monotonic()

    def _end(self, route: ModelRoute, exc: BaseException | None, prefix: str | None) -> None:
        """Record the attempt begun by :meth:`_begin` (accounting, issue 15 point 7).
        Plain calls around ``_attempt`` rather than a wrapper coroutine: one frame less
        under every open stream."""
        if exc is None:
            outcome = "ok"
        elif isinstance(exc, UpstreamError):
            outcome = exc.code
        else:
            outcome = "cancelled" if isinstance(exc, asyncio.CancelledError) else "error"
        answer = self.answer
        usage, chars = answer.progress() if answer is not None else (None, 0)
        usage0, chars0 = self._before
        self.records.append(AttemptRecord(
            route=route.name,
            provider=route.provider,
            upstream_model=self.upstream_model or route.upstream_model,
            continuation=prefix is not None,
            status=self.http_status,
            outcome=outcome,
            started_ms=round((self._began - self._started) * 1000, 1),
            elapsed_ms=round((time.monotonic() - self._began) * 1000, 1),
            relayed=self.relayed,
            content_chunks=self.content_chunks,
            usage=usage if usage is not usage0 else None,
            chars=max(0, chars - chars0),
        ))

    def _prefill(self, route: ModelRoute) -> bool:
        if route.supports_prefill is not None:
            return route.supports_prefill
        return self.client.provider(route).supports_prefill

    def _can_continue(self, cut: UpstreamError) -> str | None:
        """The exact partial text to continue from, or None when this cut is final."""
        if not self.route.continue_after_cut or self.answer is None:
            return None
        if isinstance(cut, UpstreamTimeout):
            if cut.phase != "idle":  # the total budget is spent: nothing may go on
                return None
        elif not isinstance(cut, UpstreamIncomplete | UpstreamProtocolError):
            return None  # an error the provider reported is its answer, not a cut
        text, tool_calls = self.answer.partial()
        if not text or tool_calls:  # never inside tool-call arguments
            return None
        limit = self.body.get("max_completion_tokens", self.body.get("max_tokens"))
        if isinstance(limit, int) and sum(attempt_usage(a)[0] for a in self.records) >= limit:
            return None  # the client's token limit is reached: nothing more to ask for
        return text

    async def _continue(
        self,
        cut: UpstreamError,
        chain: list[ModelRoute],
        route: ModelRoute,
        sink: Callable[[list[Event]], Awaitable[None]],
        sink_now: Sink | None,
    ) -> None:
        """Continue a cut answer: the same route again, then the others of the chain,
        each only if it takes an assistant prefix (a route that does not is never asked,
        so its 400 can never hide the cut). Raises ``cut`` when none can."""
        breakers = self.client.breakers
        for _ in range(MAX_CONTINUATIONS):
            prefix = self._can_continue(cut)
            if prefix is None:
                raise cut
            candidates = [route] + [r for r in chain if r is not route]
            for candidate in candidates:
                if not self._prefill(candidate) or time.monotonic() >= self._deadline:
                    continue
                if await breakers.admit(candidate) is not None:
                    continue
                self._continuing = ContinueNotice(self.attempts + 1, candidate.name,
                                                  cut.code, len(prefix))
                self._begin(candidate)
                try:
                    await self._attempt(candidate, self.client.provider(candidate),
                                        sink, sink_now, prefix)
                except BaseException as exc:
                    self._end(candidate, exc, prefix)
                    if not isinstance(exc, UpstreamError):
                        raise
                    if not self.relayed:
                        log.info("route %s could not continue: %s", candidate.name, exc.code)
                        await _record_failure(breakers, candidate, exc)
                        continue
                    await breakers.record(candidate, True)
                    cut, route = exc, candidate  # it went on, then broke too
                    break
                finally:
                    self._continuing = None
                self._end(candidate, None, prefix)
                await breakers.record(candidate, True)
                return
            else:
                raise cut
        raise cut

    def _wait(self, exc: UpstreamError, attempt: int, policy: Any) -> float:
        if exc.retry_after is not None:
            return float(min(exc.retry_after, policy.max_retry_after))
        ceiling = min(policy.max_delay, policy.base_delay * (2 ** (attempt - 1)))
        return random.uniform(0, ceiling)  # full jitter

    async def _announce(
        self,
        exc: UpstreamError,
        attempt: int,
        max_attempts: int,
        wait: float,
        route: ModelRoute,
        next_route: ModelRoute,
        reason: str = "",
    ) -> None:
        if self.on_retry is None:
            return
        status = exc.upstream_status if isinstance(exc, UpstreamStatusError) else None
        if not reason:
            reason = "fallback" if next_route is not route else exc.code
        await self.on_retry(
            RetryNotice(
                attempt, max_attempts, wait, reason, status, route.name, next_route.name,
                exc.message,
            )
        )

    def _request_body(self, route: ModelRoute, prefix: str | None = None) -> bytes:
        body = dict(self.body)
        if prefix is not None:
            used = sum(attempt_usage(a)[0] for a in self.records)
            body.update(_prefill_body(self.body, prefix,
                                      self.client.provider(route).prefill_flag, used))
        body["model"] = route.upstream_model
        body["stream"] = True
        options = body.get("stream_options")
        body["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                  "include_usage": True}
        return orjson.dumps(body)

    async def _whole_answer(
        self,
        route: ModelRoute,
        resp: Response,
        watchdog: _Watchdog,
        sink: Callable[[list[Event]], Awaitable[None]],
        budget: Callable[[str], float],
    ) -> None:
        """A ``chat.completion`` object answered to ``stream: true``: relayed whole, as the
        events its stream would have carried (text, reasoning, tool calls, finish, usage).
        The first-token budget covers reading it."""
        try:
            body = await resp.read_all(_COMPLETION_BODY_LIMIT)
        except (HTTPError, OSError) as exc:
            if watchdog.expired:
                raise UpstreamTimeout(watchdog.phase, budget(watchdog.phase)) from None
            with _map_errors(watchdog.phase, budget):
                raise exc from None
        if len(body) >= _COMPLETION_BODY_LIMIT:  # not an answer we can hold
            raise UpstreamProtocolError("upstream answered a JSON body larger than "
                                        f"{_COMPLETION_BODY_LIMIT >> 20} MB to a stream request")
        events, model = completion_events(body, think_tags=route.think_tags)
        self.upstream_model = model
        self.content_chunks = sum(1 for e in events if isinstance(e, TextDelta | ReasoningDelta))
        if events:
            self.relayed = True
            await sink(events)

    async def _attempt(
        self,
        route: ModelRoute,
        provider: Provider,
        sink: Callable[[list[Event]], Awaitable[None]],
        sink_now: Sink | None,
        prefix: str | None = None,
    ) -> None:
        """One HTTP request; the first call of ``sink`` marks the first token. With
        ``prefix``, it asks the route to continue that partial answer."""
        timeouts = provider.timeouts
        target = self.client.chat_target(provider)
        loop = asyncio.get_running_loop()
        start = loop.time()
        # The whole call stays inside the requested model's total budget.
        left = max(0.0, self._deadline - time.monotonic())
        total_deadline = start + min(timeouts.total, left)
        first_token = timeouts.first_token if route.first_token is None else route.first_token
        first_deadline = min(start + first_token, total_deadline)

        def budget(phase: str) -> float:
            return first_token if phase == "first_token" else float(getattr(timeouts, phase))

        with _map_errors("first_token", budget):
            # Only this await inside the timeout: it may cancel nothing else.
            async with asyncio.timeout_at(first_deadline):
                resp = await self.client._send(
                    target, self._request_body(route, prefix), timeouts.connect
                )
        self.http_status = resp.status
        watchdog = _Watchdog(loop, first_deadline, "first_token", resp.close)
        complete = False
        try:
            if resp.status != 200:
                with _map_errors("first_token", budget):
                    raise await self.client.status_error(
                        target, resp, "POST", "/chat/completions", timeouts.connect + 5)
            content_type = resp.headers.get("content-type", "")
            if _is_json(content_type):
                if self.on_accept is not None:
                    self.on_accept(route)
                await self._whole_answer(route, resp, watchdog, sink, budget)
                complete = True
                return
            if content_type.lower().startswith("text/html"):  # a web page, not an API
                with _map_errors("first_token", budget):
                    async with asyncio.timeout(timeouts.connect + 5):
                        page = await resp.read_all(_ERROR_BODY_LIMIT)
                said = _error_message(page, 200, content_type)
                raise UpstreamProtocolError(self.client.redact(
                    f"upstream answered a web page{f' ({said})' if said else ''} instead of "
                    f"an event stream to POST {_base(target)}/chat/completions: is the base "
                    "URL an OpenAI-compatible API?"),
                    retryable=False)
            if self.on_accept is not None:
                self.on_accept(route)
            # The parsers are made when the first bytes come: a stream waiting minutes for
            # a reasoning model's first token holds none of them.
            relay: _Relay | None = None
            read = resp.read
            waiting_first = True
            while True:
                # Only the read is mapped to upstream errors: what the sink raises (the
                # journal, say) passes through as it is.
                try:
                    data = await read()
                except (HTTPError, OSError) as exc:
                    if relay is not None and relay.failure is not None:  # the data callback's
                        raise relay.failure from None
                    if relay is not None and relay.chunks.done:
                        break  # after [DONE]: how the rest of the body ends does not matter
                    if watchdog.expired:
                        raise UpstreamTimeout(watchdog.phase, budget(watchdog.phase)) from None
                    with _map_errors(watchdog.phase, budget):
                        raise exc from None
                if relay is None:
                    relay = _Relay(self, route, resp, watchdog, loop, timeouts.idle,
                                   total_deadline, sink_now)
                elif relay.failure is not None:
                    raise relay.failure
                if not data:
                    break
                out, failure = relay.events(data)
                if waiting_first:
                    if not out or all(isinstance(e, Usage | Finish) for e in out):
                        if failure is not None:
                            raise failure
                        continue
                    waiting_first = False
                    watchdog.phase = "idle"
                    # (relay's idle budget: shorter if this read ended with [DONE])
                    watchdog.rearm(min(loop.time() + relay._idle, total_deadline))
                    self.upstream_model = relay.chunks.model
                    if self._continuing is not None and self.answer is not None:
                        # Announced once its first new text is here, before that text.
                        await self.answer.on_continue(self._continuing)
                    if sink_now is not None:
                        resp.stream(relay.on_data)  # the next reads go straight to sink_now
                relay.tick()
                if out:
                    self.relayed = True
                    await sink(out)
                if failure is not None:
                    raise failure
            assert relay is not None  # made on the first pass, which every exit follows
            tail: list[Event] = []
            relay.chunks.flush(tail)
            if tail:
                self.relayed = True
                await sink(tail)
            if watchdog.expired and not relay.chunks.done:  # the watchdog closed the response
                raise UpstreamTimeout(watchdog.phase, budget(watchdog.phase))
            relay.chunks.finish()
            complete = True  # released to the pool only if the body really ended cleanly
        finally:
            watchdog.cancel()
            if complete:
                resp.release()  # body read to the end: keep the connection for the next answer
            else:
                # Closing (not releasing) drops the connection, so an upstream cut off
                # mid-answer (Stop, timeout, error) sees it closed and stops billing.
                resp.close()


def _base(target: _ChatTarget) -> str:
    """The base URL requests of ``target`` went to (no key: keys travel in headers)."""
    origin = target.origin
    assert origin is not None
    return f"{origin.scheme}://{origin.host_header}{origin.base_path}"


def _is_json(content_type: str) -> bool:
    """A JSON body where a stream was asked for (some servers ignore ``stream``)."""
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or kind.endswith("+json")


async def _record_failure(breakers: Breakers, route: ModelRoute, exc: UpstreamError) -> None:
    """Count a failure a retry could not fix against the route's breaker: connect
    errors, timeouts, 5xx and broken streams; never a 4xx (429 included)."""
    if isinstance(exc, UpstreamStatusError):
        if exc.upstream_status < 500:
            return
    elif not isinstance(exc, UpstreamConnectError | UpstreamTimeout | UpstreamIncomplete
                        | UpstreamProtocolError):
        return
    await breakers.record(route, False)


def _prefill_body(
    body: Mapping[str, Any], prefix: str, flag: str, used: int
) -> dict[str, Any]:
    """The fields of a continuation request: the messages plus the partial answer as the
    last ``assistant`` message, with the provider's flag where it needs one, and what is
    left of the client's token limit after the ``used`` tokens already generated."""
    last: dict[str, Any] = {"role": "assistant", "content": prefix}
    extra: dict[str, Any] = {}
    if flag == "prefix":  # DeepSeek (beta base URL), Mistral
        last["prefix"] = True
    elif flag == "continue_final_message":  # vLLM
        extra = {"continue_final_message": True, "add_generation_prompt": False}
    for key in ("max_tokens", "max_completion_tokens"):
        limit = body.get(key)
        if isinstance(limit, int) and not isinstance(limit, bool):
            extra[key] = max(1, limit - used)
    return {"messages": [*body.get("messages", []), last], **extra}


class _Relay:
    """One attempt's body on its way to the sink: the parsers and the per-read bookkeeping,
    shared by the task's read loop and, once streaming, the connection's data callback."""

    __slots__ = ("_call", "_idle", "_loop", "_resp", "_sink_now", "_total_deadline",
                 "_watchdog", "body", "chunks", "failure")

    def __init__(
        self,
        call: UpstreamCall,
        route: ModelRoute,
        resp: Response,
        watchdog: _Watchdog,
        loop: asyncio.AbstractEventLoop,
        idle: float,
        total_deadline: float,
        sink_now: Sink | None,
    ) -> None:
        self._call = call
        self._resp = resp
        self._watchdog = watchdog
        self._loop = loop
        self._idle = idle
        self._total_deadline = total_deadline
        self._sink_now = sink_now
        self.body = BodyDecoder(think_tags=route.think_tags)
        self.chunks = self.body.chunks
        self.failure: BaseException | None = None  # what the data callback hit

    def events(self, data: bytes) -> tuple[list[Event], UpstreamError | None]:
        """The events of one read, and the error that stopped the parse (if any): the
        good text before a corrupt chunk is still relayed."""
        result = self.body.decode(data)
        self._call.content_chunks = self.chunks.content_chunks
        if self.chunks.done and self._idle > _AFTER_DONE_S:
            self._after_done()
        return result

    def _after_done(self) -> None:
        """``[DONE]`` arrived: the answer is complete. The end of the body is still read
        (so the connection can be reused), but only briefly: a server that stalls or
        breaks after ``[DONE]`` costs a connection, not the answer or a long wait."""
        self._idle = _AFTER_DONE_S
        self._watchdog.rearm(min(self._loop.time() + _AFTER_DONE_S, self._total_deadline))

    def tick(self) -> None:
        """A read arrived while streaming: push the idle deadline (a float; the watchdog
        re-arms itself lazily)."""
        watchdog = self._watchdog
        watchdog.deadline = deadline = min(self._loop.time() + self._idle, self._total_deadline)
        if deadline == self._total_deadline:
            watchdog.phase = "total"

    def on_data(self, data: bytes) -> None:
        """The connection's data callback once streaming (a
        :class:`~tokenrelay.httpclient.BodyReceiver`). A failure is kept and the
        connection closed; the task's pending read then raises it (``failure``).
        (``events`` and ``tick`` inlined: this runs once per read.)"""
        if self.failure is not None:
            return
        try:
            out, failure = self.body.decode(data)
            chunks = self.chunks
            self._call.content_chunks = chunks.content_chunks
            if chunks.done and self._idle > _AFTER_DONE_S:
                self._after_done()
            watchdog = self._watchdog
            deadline = self._loop.time() + self._idle
            if deadline >= self._total_deadline:
                deadline = self._total_deadline
                watchdog.phase = "total"
            watchdog.deadline = deadline
            if out:
                self._sink_now(out)  # type: ignore[misc]  # set: stream(on_data) needs it
            if failure is not None:
                raise failure
        except Exception as exc:
            self.failure = exc
            self._resp.close()


class _Watchdog:
    """A lazily re-armed timer: fires ``on_expire`` once ``deadline`` (loop time) passes.

    Moving ``deadline`` is a plain assignment; the timer notices when it fires early and
    re-arms itself, so the hot path pays no timer operations per read.
    """

    __slots__ = ("_handle", "_loop", "_on_expire", "deadline", "expired", "phase")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        deadline: float,
        phase: str,
        on_expire: Callable[[], object],
    ) -> None:
        self._loop = loop
        self.deadline = deadline
        self.phase = phase
        self.expired = False
        self._on_expire = on_expire
        # A coarse timer (timerwheel): a budget of seconds, one per open stream.
        self._handle: timerwheel.Deadline | None = timerwheel.call_at(loop, deadline, self._fire)

    def _fire(self) -> None:
        if self._loop.time() < self.deadline:
            self._handle = timerwheel.call_at(self._loop, self.deadline, self._fire)
            return
        self._handle = None
        self.expired = True
        self._on_expire()

    def rearm(self, deadline: float) -> None:
        """Move the deadline, also earlier than the timer currently set."""
        self.cancel()
        self.deadline = deadline
        self._handle = timerwheel.call_at(self._loop, deadline, self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
