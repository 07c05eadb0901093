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
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import urljoin

import orjson

from tokenrelay import timerwheel
from tokenrelay.bodydecoder import BodyDecoder
from tokenrelay.chunks import completion_events
from tokenrelay.config import ModelRoute, Provider, Settings
from tokenrelay.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamIncomplete,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamTimeout,
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
    ) -> None:
        self.settings = settings
        self.pool = pool
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


class UpstreamCall:
    """One answer's upstream request, with retries and fallbacks before the first token."""

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

    def _chain(self) -> list[ModelRoute]:
        chain = [self.route]
        for name in self.route.fallbacks:
            fallback = self.client.settings.route(name)
            if fallback is not None and fallback not in chain:
                chain.append(fallback)
        return chain

    async def run(
        self,
        sink: Callable[[list[Event]], Awaitable[None]],
        sink_now: Callable[[list[Event]], None] | None = None,
    ) -> None:
        """Hand each read's events to ``sink``; raises UpstreamError when the answer
        cannot go on. Nothing is retried once ``sink`` has been called.

        With ``sink_now`` (a sink that never waits), once the first token is relayed the
        rest of the body is parsed and handed over straight from the connection's data
        callback: no task wake-up per read."""
        chain = self._chain()
        started = time.monotonic()
        budget = self.client.provider(self.route).retry.budget
        for index, route in enumerate(chain):
            provider = self.client.provider(route)
            policy = provider.retry
            attempt = 0
            while True:
                attempt += 1
                self.attempts += 1
                self.route_used = route
                self.relayed = False
                try:
                    await self._attempt(route, provider, sink, sink_now)
                    return
                except UpstreamError as exc:
                    if self.relayed or not exc.retryable:
                        raise
                    last_model = index == len(chain) - 1
                    overloaded = isinstance(exc, UpstreamStatusError) and exc.overloaded
                    spent = attempt >= policy.max_attempts
                    if spent and last_model:
                        raise
                    fall_back = not last_model and (spent or (overloaded and attempt >= 2))
                    wait = self._wait(exc, attempt, policy)
                    if time.monotonic() - started + wait > budget:
                        if last_model:
                            raise
                        fall_back = True
                    next_route = chain[index + 1] if fall_back else route
                    if fall_back:
                        wait = min(wait, policy.base_delay)
                    await self._announce(exc, attempt, policy.max_attempts, wait, route, next_route)
                    if wait > 0:
                        await asyncio.sleep(wait)
                    if fall_back:
                        break

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
    ) -> None:
        if self.on_retry is None:
            return
        status = exc.upstream_status if isinstance(exc, UpstreamStatusError) else None
        reason = exc.code
        if next_route is not route:
            reason = "fallback"
        await self.on_retry(
            RetryNotice(
                attempt, max_attempts, wait, reason, status, route.name, next_route.name,
                exc.message,
            )
        )

    def _request_body(self, route: ModelRoute) -> bytes:
        body = dict(self.body)
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
        sink_now: Callable[[list[Event]], None] | None,
    ) -> None:
        """One HTTP request; the first call of ``sink`` marks the first token."""
        timeouts = provider.timeouts
        target = self.client.chat_target(provider)
        loop = asyncio.get_running_loop()
        start = loop.time()
        total_deadline = start + timeouts.total
        first_deadline = min(start + timeouts.first_token, total_deadline)

        def budget(phase: str) -> float:
            return float(getattr(timeouts, phase))

        with _map_errors("first_token", budget):
            # Only this await inside the timeout: it may cancel nothing else.
            async with asyncio.timeout_at(first_deadline):
                resp = await self.client._send(
                    target, self._request_body(route), timeouts.connect
                )
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
        sink_now: Callable[[list[Event]], None] | None,
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
        """The connection's data callback once streaming. A failure is kept and the
        connection closed; the task's pending read then raises it (``failure``)."""
        if self.failure is not None:
            return
        try:
            out, failure = self.events(data)
            self.tick()
            if out:
                self._sink_now(out)  # type: ignore[misc]
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
