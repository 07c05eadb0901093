"""The upstream client (upstream.py): its pure parts (Retry-After parsing, provider error
messages), then one call against the fault upstream on a loopback port: the request it
sends, the typed events it hands over per read, and its retry policy before and after the
first token. Through the whole gateway, provider errors are in test_upstream_errors.py,
retries against the simulator in test_resilience.py, fallbacks, breakers and
continuations in test_failover.py."""

from __future__ import annotations

import email.utils
from pathlib import Path
from typing import Any

import pytest

from support.answers import BODY, answer_parts
from support.fault_upstream import FaultUpstream, ok, reset_after, status
from tokenrelay import events as ev
from tokenrelay.config import ModelRoute
from tokenrelay.errors import UpstreamError, UpstreamStatusError
from tokenrelay.upstream import RetryNotice, _error_message, parse_retry_after, status_message


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after": " 3 "}, 3.0),
        ({"retry-after": "-4"}, 0.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # the precise one wins
        ({"retry-after-ms": "soon", "retry-after": "9"}, 9.0),
        ({"retry-after": "whenever"}, None),
        ({}, None),
    ],
)
def test_retry_after_seconds_and_milliseconds(headers: dict[str, str],
                                               expected: float | None) -> None:
    assert parse_retry_after(headers) == expected


def test_retry_after_http_date() -> None:
    now = 1_800_000_000.0
    later = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after({"retry-after": later}, now=now) == pytest.approx(30, abs=1)
    earlier = email.utils.formatdate(now - 30, usegmt=True)
    assert parse_retry_after({"retry-after": earlier}, now=now) == 0.0


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"error": {"message": "quota exceeded", "type": "x"}}', "quota exceeded"),
        (b'{"error": "model overloaded"}', "model overloaded"),
        (b'{"detail": "not found"}', "not found"),
        (b"plain text failure", "plain text failure"),
        (b"", ""),  # nothing said: the caller names the status, once
        (b"[1, 2]", ""),
    ],
)
def test_provider_error_message(body: bytes, expected: str) -> None:
    assert _error_message(body, 502) == expected


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("/v1/chat/completions", "set base_url to http://h:1/v1"),
        ("https://api.example.com/v1/chat/completions?key=sk-x", "set base_url to "
         "https://api.example.com/v1"),
    ],
)
def test_redirect_message_resolves_a_relative_location_and_drops_the_query(
        location: str, expected: str) -> None:
    message = status_message(308, "", "http://h:1/chat/completions", "POST", "http://h:1",
                             location)
    assert message.endswith(expected) and "key=" not in message


# -- one call against the fault upstream ----------------------------------------------------

TOKENS = ["Hel", "lo", ", ", "wor", "ld", "!"]
FAST_RETRIES = {"TOKENRELAY_RETRY_MAX_ATTEMPTS": "3", "TOKENRELAY_RETRY_BASE_DELAY_S": "0.01",
                "TOKENRELAY_RETRY_MAX_DELAY_S": "0.02"}



class Calls:
    """What a call handed over: the events of each read, retry notices, accepted routes."""

    def __init__(self) -> None:
        self.reads: list[list[ev.Event]] = []
        self.retries: list[RetryNotice] = []
        self.accepted: list[ModelRoute] = []

    async def sink(self, events: list[ev.Event]) -> None:
        self.reads.append(events)

    async def on_retry(self, notice: RetryNotice) -> None:
        self.retries.append(notice)

    @property
    def events(self) -> list[ev.Event]:
        return [e for read in self.reads for e in read]

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, ev.TextDelta))


async def call(fault_upstream: FaultUpstream, tmp_path: Path,
               body: dict[str, Any] | None = None, /, **env: str) -> Calls:
    """Run one call of model ``fault-model``; raises what the call raises."""
    seen = Calls()
    async with answer_parts(fault_upstream.base_url, tmp_path, **env) as p:
        route = p.route()
        one = p.upstream.call(route, body or BODY, on_retry=seen.on_retry,
                              on_accept=seen.accepted.append)
        await one.run(seen.sink)
    return seen


async def test_the_request_names_the_upstream_model_asks_for_usage_and_carries_the_key(
        fault_upstream: FaultUpstream, tmp_path: Path) -> None:
    body = {**BODY, "temperature": 0.5, "stream_options": {"extra": 1}}
    await call(fault_upstream, tmp_path, body, TOKENRELAY_UPSTREAM_API_KEY="sk-provider-0123")
    [request] = fault_upstream.requests
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.headers["authorization"] == "Bearer sk-provider-0123"
    assert request.json == {**body, "model": "fault-model", "stream": True,
                            "stream_options": {"extra": 1, "include_usage": True}}


async def test_each_read_reaches_the_sink_as_typed_events(
        fault_upstream: FaultUpstream, tmp_path: Path) -> None:
    fault_upstream.script(ok(TOKENS, reasoning=["thin", "king"]))
    seen = await call(fault_upstream, tmp_path)
    assert [route.name for route in seen.accepted] == ["fault-model"]
    assert seen.text == "".join(TOKENS)
    assert "".join(e.text for e in seen.events if isinstance(e, ev.ReasoningDelta)) == "thinking"
    assert [e for e in seen.events if isinstance(e, ev.Finish)] == [ev.Finish("stop")]
    [usage] = [e for e in seen.events if isinstance(e, ev.Usage)]
    assert usage.completion_tokens > 0
    assert all(read for read in seen.reads)  # never an empty hand-over
    assert seen.retries == []


async def test_a_failure_before_the_first_token_is_retried_and_announced(
        fault_upstream: FaultUpstream, tmp_path: Path) -> None:
    fault_upstream.script(status(503), ok(TOKENS))
    seen = await call(fault_upstream, tmp_path, **FAST_RETRIES)
    [notice] = seen.retries
    assert (notice.attempt, notice.max_attempts, notice.status) == (1, 3, 503)
    assert notice.model == notice.next_model == "fault-model"
    assert 0 <= notice.wait_s <= 0.02
    assert seen.text == "".join(TOKENS) and len(fault_upstream.requests) == 2


async def test_nothing_is_retried_after_the_first_token(
        fault_upstream: FaultUpstream, tmp_path: Path) -> None:
    fault_upstream.script(reset_after(TOKENS, 2), ok(TOKENS))
    seen = Calls()
    with pytest.raises(UpstreamError) as caught:
        async with answer_parts(fault_upstream.base_url, tmp_path, **FAST_RETRIES) as p:
            await p.upstream.call(p.route(), BODY, on_retry=seen.on_retry).run(seen.sink)
    assert caught.value.code == "upstream_incomplete"
    assert seen.text == "".join(TOKENS[:2])  # handed over before the cut, and kept
    assert seen.retries == [] and len(fault_upstream.requests) == 1


async def test_a_client_error_is_not_retried(fault_upstream: FaultUpstream, tmp_path: Path) -> None:
    fault_upstream.script(status(400), ok(TOKENS))
    with pytest.raises(UpstreamStatusError) as caught:
        await call(fault_upstream, tmp_path, **FAST_RETRIES)
    assert caught.value.upstream_status == 400 and not caught.value.retryable
    assert len(fault_upstream.requests) == 1
