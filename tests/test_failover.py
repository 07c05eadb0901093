"""Issue 15: failover that rescues answers, against two fault upstreams over loopback.

Each provider is its own :class:`FaultUpstream`, so attempt counts and times per route come
from that upstream's request log. Every scenario runs on ``/api/chat`` and on ``/v1``
(streaming and not, through the openai SDK) where the surface matters.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest

from support.client import read_stream
from support.failover import SURFACES, ask, config_gateway, model, provider
from support.fault_upstream import (
    FaultUpstream,
    continues,
    corrupt,
    no_head,
    ok,
    rejects_prefill,
    reset_after,
    slow,
    stall_after,
    stall_first,
    status,
    zero_usage,
)
from support.redis_server import delete_prefix
from tokenrelay.simulator import build_text
from tokenrelay.upstream import MAX_CONTINUATIONS

TOKENS = ["Hel", "lo", ", ", "wor", "ld", " — ", "ça ", "va", " 😀", "!"]
TEXT = "".join(TOKENS)
REDIS_URL = "redis://127.0.0.1:6379/0"
BUDGET = 1.5  # the first-token deadline under test, seconds
# The deadline runs from the gateway's attempt, a little before the upstream has read the
# whole request (its "arrived"): gaps seen by the upstream may be that much shorter.
EARLY = 0.9 * BUDGET


@pytest.fixture
async def pair() -> AsyncIterator[tuple[FaultUpstream, FaultUpstream]]:
    """(primary, backup): one upstream per provider."""
    async with FaultUpstream("a-model") as a, FaultUpstream("b-model") as b:
        yield a, b


def two_routes(a: FaultUpstream, b: FaultUpstream, **main: object) -> list[str]:
    """Model ``main`` on the primary falling back to ``spare`` on the backup; the model
    overrides the provider's 10 s first-token budget with BUDGET."""
    return [
        provider("primary", a),
        provider("backup", b),
        model("main", "primary", "a-model", fallbacks=["spare"],
              timeouts={"first_token": BUDGET}, **main),
        model("spare", "backup", "b-model"),
    ]


# ---- 1. first-token deadline -----------------------------------------------------------


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("silence", ["no_head", "stall_first"])
async def test_a_silent_route_is_left_for_the_next_one_once_its_first_token_deadline_passes(
    pair, http, surface, silence
):
    a, b = pair
    a.script(no_head() if silence == "no_head" else stall_first())
    b.script(ok(TOKENS))
    async with config_gateway(*two_routes(a, b)) as gw:
        started = time.monotonic()
        answer = await ask(http, gw, surface, "main")
        elapsed = time.monotonic() - started
    assert answer.ok and answer.text == TEXT
    assert len(a.requests) == 1, "the silent route is tried once"
    assert len(b.requests) == 1
    waited = b.requests[0].arrived - a.requests[0].arrived
    assert EARLY <= waited < 2 * BUDGET, "fallback when the deadline passed, not later"
    assert elapsed < 2 * BUDGET
    await asyncio.wait_for(a.wait_client_closed(1), 10)  # abandoned: the provider stops
    if surface != "chat":
        assert answer.model == "spare", "/v1 names the model that answered"
    if surface == "chat":
        assert answer.stream is not None
        (retry,) = answer.stream.named("retry")
        assert retry.data["reason"] == "fallback" and retry.data["wait_ms"] == 0
        assert (retry.data["model"], retry.data["next_model"]) == ("main", "spare")
        assert answer.end["model"] == "spare" and answer.end["models"] == ["spare"]


async def test_retrying_a_route_that_timed_out_is_opt_in(pair, http):
    a, b = pair
    a.script(stall_first())
    b.script(ok(TOKENS))
    tables = two_routes(a, b, retry_on_timeout=True)
    tables[0] = provider("primary", a, attempts=2)
    async with config_gateway(*tables) as gw:
        answer = await ask(http, gw, "chat", "main")
    assert answer.ok and answer.text == TEXT
    assert len(a.requests) == 2 and len(b.requests) == 1
    first, second = a.requests
    assert second.arrived - first.arrived >= EARLY
    assert b.requests[0].arrived - second.arrived >= EARLY
    assert answer.stream is not None
    reasons = [e.data["reason"] for e in answer.stream.named("retry")]
    assert reasons == ["upstream_timeout", "fallback"]


@pytest.mark.parametrize("surface", SURFACES)
async def test_a_model_with_one_route_retries_it_within_its_policy(pair, http, surface):
    a, _ = pair
    a.script(stall_first())
    tables = [provider("primary", a, attempts=2),
              model("solo", "primary", "a-model", timeouts={"first_token": BUDGET})]
    async with config_gateway(*tables) as gw:
        answer = await ask(http, gw, surface, "solo")
    assert not answer.ok and answer.error_code == "upstream_timeout"
    assert len(a.requests) == 2
    assert a.requests[1].arrived - a.requests[0].arrived >= EARLY
    if surface == "v1":
        assert answer.status == 504


async def test_the_whole_call_stays_inside_the_total_budget(pair, http):
    a, b = pair
    a.script(stall_first())
    b.script(stall_first())
    total = 1.5 * BUDGET  # the primary's deadline, then half of one for the backup
    tables = [provider("primary", a, total=total), provider("backup", b),
              model("main", "primary", "a-model", fallbacks=["spare"],
                    timeouts={"first_token": BUDGET}),
              model("spare", "backup", "b-model")]
    async with config_gateway(*tables) as gw:
        started = time.monotonic()
        answer = await ask(http, gw, "chat", "main")
        elapsed = time.monotonic() - started
    assert answer.error_code == "upstream_timeout"
    assert len(a.requests) == 1 and len(b.requests) == 1
    assert total <= elapsed < 2 * total


# ---- 2. context-window fallbacks ---------------------------------------------------------

TOO_LONG = {"error": {
    "message": "This model's maximum context length is 8192 tokens. However, your messages "
               "resulted in 9000 tokens. Please reduce the length of the messages.",
    "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}}


@pytest.mark.parametrize("surface", SURFACES)
async def test_context_too_long_goes_to_the_context_fallback_once(pair, http, surface):
    a, b = pair
    a.script(status(400, TOO_LONG))
    b.script(ok(TOKENS))
    tables = [provider("primary", a), provider("backup", b),
              model("main", "primary", "a-model", context_fallbacks=["big"]),
              model("big", "backup", "b-model")]
    async with config_gateway(*tables) as gw:
        answer = await ask(http, gw, surface, "main")
    assert answer.ok and answer.text == TEXT
    assert len(a.requests) == 1, "never resent unchanged to the same model"
    assert len(b.requests) == 1 and b.requests[0].json["model"] == "b-model"
    assert b.requests[0].json["messages"] == a.requests[0].json["messages"]
    if surface == "chat":
        assert answer.stream is not None
        (retry,) = answer.stream.named("retry")
        assert retry.data["reason"] == "context_fallback" and retry.data["status"] == 400
        assert answer.end["model"] == "big"


@pytest.mark.parametrize("surface", SURFACES)
async def test_context_too_long_without_context_fallbacks_is_a_clear_400(pair, http, surface):
    a, b = pair
    a.script(status(400, TOO_LONG))
    tables = [provider("primary", a), provider("backup", b),
              model("main", "primary", "a-model", fallbacks=["spare"]),
              model("spare", "backup", "b-model")]
    async with config_gateway(*tables) as gw:
        answer = await ask(http, gw, surface, "main")
    assert not answer.ok and answer.error_code == "context_length_exceeded"
    assert "maximum context length" in answer.end["error"]["message"]
    assert len(a.requests) == 1 and len(b.requests) == 0  # not an outage: no fallback
    if surface == "v1":
        assert answer.status == 400


@pytest.mark.parametrize(("body", "expected"), [
    ({"error": {"message": "prompt is too long: 208310 tokens > 200000 maximum",
                "type": "invalid_request_error"}}, True),  # Anthropic
    ({"error": {"message": "the request exceeds the available context size, try increasing "
                "it", "type": "exceed_context_size_error"}}, True),  # llama.cpp
    ({"object": "error", "message": "This model's maximum context length is 4096 tokens. "
      "However, you requested 5000 tokens", "type": "BadRequestError"}, True),  # vLLM
    ({"error": {"message": "Prompt contains 40000 tokens and 0 draft tokens, too large for "
                "model with 32768 maximum context length"}}, True),  # Mistral
    ({"error": {"message": "max_tokens must be at most 4096",
                "type": "invalid_request_error"}}, False),
])
async def test_context_too_long_is_recognised_in_providers_words(pair, http, body, expected):
    a, b = pair
    a.script(status(400, body))
    b.script(ok(TOKENS))
    tables = [provider("primary", a), provider("backup", b),
              model("main", "primary", "a-model", context_fallbacks=["big"]),
              model("big", "backup", "b-model")]
    async with config_gateway(*tables) as gw:
        answer = await ask(http, gw, "chat", "main")
    assert answer.ok is expected
    assert len(b.requests) == int(expected)
    if not expected:
        assert answer.error_code == "upstream_rejected"


# ---- 3. continuation after a cut ----------------------------------------------------------

CUTS = {
    "connection cut": (lambda: reset_after(TOKENS, 4), "upstream_incomplete"),
    "idle stall": (lambda: stall_after(TOKENS, 4), "upstream_timeout"),
    "corrupt chunk": (lambda: corrupt(TOKENS, 4), "upstream_error"),
}


@pytest.mark.parametrize("surface", [*SURFACES, "v1-sse"])
@pytest.mark.parametrize("cut", list(CUTS))
async def test_a_cut_answer_is_continued_from_its_exact_text(pair, http, surface, cut):
    a, _ = pair
    step, reason = CUTS[cut]
    tables = [provider("primary", a, supports_prefill=True),
              model("main", "primary", "a-model", continue_after_cut=True)]
    async with config_gateway(*tables) as gw:
        a.script(ok(TOKENS))
        uncut = await ask(http, gw, surface, "main")
        a.script(step(), continues(TOKENS))
        answer = await ask(http, gw, surface, "main")
        async with http.get(gw.base_url + "/metrics") as r:
            metrics = await r.text()
    assert f'tokenrelay_continuations_total{{reason="{reason}"}} 1.0' in metrics
    assert uncut.ok and uncut.text == TEXT
    assert answer.ok and answer.text == uncut.text, "no duplicated or altered text"
    assert len(a.requests) == 3
    partial = "".join(TOKENS[:4])
    assert a.requests[2].json["messages"] == [
        *a.requests[1].json["messages"], {"role": "assistant", "content": partial}]
    if surface == "chat":
        assert answer.stream is not None
        (continued,) = answer.stream.named("continued")
        assert continued.data == {"attempt": 2, "model": "main", "reason": reason,
                                  "offset": len(partial)}
        assert not answer.stream.named("error")
        assert answer.end["models"] == ["main"]
    elif surface == "v1-sse":  # /v1 clients just see more deltas
        assert answer.raw.endswith(b"data: [DONE]\n\n")
        assert b"continued" not in answer.raw and b"retry" not in answer.raw


async def test_a_route_without_prefill_is_skipped_for_continuation(pair, http):
    a, b = pair
    a.script(reset_after(TOKENS, 4), rejects_prefill(TOKENS))
    b.script(continues(TOKENS))
    tables = [provider("primary", a), provider("backup", b, supports_prefill=True),
              model("main", "primary", "a-model", fallbacks=["spare"],
                    continue_after_cut=True),
              model("spare", "backup", "b-model")]
    async with config_gateway(*tables) as gw:
        answer = await ask(http, gw, "chat", "main")
    assert answer.ok and answer.text == TEXT
    assert len(a.requests) == 1, "a route that cannot take a prefix is never asked"
    assert len(b.requests) == 1
    assert b.requests[0].json["messages"][-1] == {"role": "assistant",
                                                  "content": "".join(TOKENS[:4])}
    assert answer.stream is not None
    (continued,) = answer.stream.named("continued")
    assert continued.data["model"] == "spare"
    assert answer.end["models"] == ["main", "spare"]
    assert answer.end["model"] == "spare"


@pytest.mark.parametrize("surface", SURFACES)
async def test_when_no_route_can_continue_the_original_error_ends_the_stream(
    pair, http, surface
):
    a, b = pair
    # The primary claims prefill but answers 400; the backup has none: the cut stands.
    a.script(reset_after(TOKENS, 4), rejects_prefill(TOKENS))
    b.script(continues(TOKENS))
    tables = [provider("primary", a, supports_prefill=True), provider("backup", b),
              model("main", "primary", "a-model", fallbacks=["spare"],
                    continue_after_cut=True),
              model("spare", "backup", "b-model")]
    async with config_gateway(*tables) as gw:
        answer = await ask(http, gw, surface, "main")
    assert not answer.ok
    assert answer.error_code == "upstream_incomplete", "never the prefill 400"
    if surface != "v1":  # /v1 without streaming returns the error alone
        assert answer.text == "".join(TOKENS[:4])
    assert len(a.requests) == 2 and len(b.requests) == 0
    if surface == "chat":
        assert answer.stream is not None and not answer.stream.named("continued")
        assert answer.end["model"] == "main" and answer.end["models"] == ["main"]


async def test_without_the_opt_in_a_cut_is_not_continued(pair, http):
    a, _ = pair
    a.script(reset_after(TOKENS, 4), continues(TOKENS))
    tables = [provider("primary", a, supports_prefill=True),
              model("main", "primary", "a-model")]
    async with config_gateway(*tables) as gw:
        answer = await ask(http, gw, "chat", "main")
    assert answer.error_code == "upstream_incomplete"
    assert answer.text == "".join(TOKENS[:4]) and len(a.requests) == 1


# ---- 5. circuit breaker per route ----------------------------------------------------------

COOLDOWN = 1.0
ROUTE = "primary/a-model"


def breaker_routes(a: FaultUpstream, b: FaultUpstream, cooldown: float = COOLDOWN) -> list[str]:
    """``main`` (primary, one attempt per request, breaker after 2 failures) falling back
    to ``spare``; ``solo`` on the primary alone."""
    return [
        provider("primary", a, attempts=1, breaker={"failures": 2, "cooldown_s": cooldown}),
        provider("backup", b),
        model("main", "primary", "a-model", fallbacks=["spare"]),
        model("spare", "backup", "b-model"),
        model("solo", "primary", "a-model"),
    ]


async def breaker_state(http, gw) -> tuple[str, float]:
    """The route's state in /api/config and its gauge in /metrics (checked to agree)."""
    async with http.get(gw.base_url + "/api/config") as r:
        state = (await r.json())["breakers"][ROUTE]["state"]
    async with http.get(gw.base_url + "/metrics") as r:
        metrics = await r.text()
    line = next(x for x in metrics.splitlines()
                if x.startswith(f'tokenrelay_circuit_breaker_state{{route="{ROUTE}"}}'))
    gauge = float(line.split()[-1])
    assert gauge == {"closed": 0, "open": 1, "half_open": 2}[state]
    return state, gauge


async def test_a_failing_route_opens_its_breaker_is_skipped_then_probed_once(pair, http):
    a, b = pair
    a.script(status(500))
    b.script(ok(TOKENS))
    async with config_gateway(*breaker_routes(a, b)) as gw:
        for n in (1, 2):
            answer = await ask(http, gw, "chat", "main")
            assert answer.ok and len(a.requests) == n  # each time: one try, then the fallback
        assert await breaker_state(http, gw) == ("open", 1)
        answer = await ask(http, gw, "chat", "main")
        assert answer.ok and answer.end["model"] == "spare"
        assert len(a.requests) == 2, "an open route is skipped"
        assert answer.stream is not None and not answer.stream.named("retry")

        await asyncio.sleep(COOLDOWN)  # the cooldown under test passes
        assert (await breaker_state(http, gw))[0] == "half_open"
        a.script(stall_first(0.5, tokens=TOKENS))  # the probe is slow: others skip the route
        first, second = await asyncio.gather(ask(http, gw, "chat", "main"),
                                             ask(http, gw, "chat", "main"))
        assert first.ok and second.ok
        assert len(a.requests) == 3, "one probe"
        assert sorted([first.end["model"], second.end["model"]]) == ["main", "spare"]
        assert await breaker_state(http, gw) == ("closed", 0)  # the probe succeeded
        a.script(ok(TOKENS))
        answer = await ask(http, gw, "chat", "main")
        assert answer.end["model"] == "main" and len(a.requests) == 4


async def test_a_failed_probe_opens_the_breaker_again(pair, http):
    a, b = pair
    a.script(status(500))
    b.script(ok(TOKENS))
    async with config_gateway(*breaker_routes(a, b)) as gw:
        for _ in range(2):
            await ask(http, gw, "chat", "main")
        await asyncio.sleep(COOLDOWN)
        answer = await ask(http, gw, "chat", "main")  # the probe, failing: one request
        assert answer.ok and len(a.requests) == 3
        assert await breaker_state(http, gw) == ("open", 1)
        await ask(http, gw, "chat", "main")
        assert len(a.requests) == 3


async def test_client_errors_never_open_the_breaker(pair, http):
    a, b = pair
    a.script(status(429, headers={"Retry-After": "0"}))
    b.script(ok(TOKENS))
    async with config_gateway(*breaker_routes(a, b)) as gw:
        for _ in range(3):
            assert (await ask(http, gw, "chat", "main")).ok
        assert len(a.requests) == 3
        assert (await breaker_state(http, gw))[0] == "closed"


@pytest.mark.parametrize("surface", SURFACES)
async def test_a_model_whose_every_route_is_open_fails_fast_with_retry_after(
    pair, http, surface
):
    a, b = pair
    a.script(status(502))
    async with config_gateway(*breaker_routes(a, b, cooldown=30)) as gw:
        for _ in range(2):
            assert (await ask(http, gw, "chat", "solo")).error_code == "upstream_error"
        started = time.monotonic()
        answer = await ask(http, gw, surface, "solo")
        elapsed = time.monotonic() - started
    assert answer.error_code == "upstream_unavailable"
    assert len(a.requests) == 2, "no request to an open route"
    assert elapsed < 2.0  # at once: no attempt, no wait
    if surface == "chat":
        error = answer.end["error"]
        assert error["retryable"] is True and 0 < error["retry_after"] <= 30
    else:
        assert answer.status == 503
        assert 1 <= int(answer.headers["retry-after"]) <= 30


async def test_the_breaker_is_shared_by_instances_through_redis(pair, http):
    a, b = pair
    a.script(status(500))
    b.script(ok(TOKENS))
    prefix = f"test-i15-breaker:{secrets.token_hex(6)}:"
    env = {"TOKENRELAY_REDIS_URL": REDIS_URL, "TOKENRELAY_REDIS_PREFIX": prefix}
    try:
        async with config_gateway(*breaker_routes(a, b), **env) as one, \
                config_gateway(*breaker_routes(a, b), **env) as two:
            for _ in range(2):
                assert (await ask(http, one, "chat", "main")).ok
            assert len(a.requests) == 2
            assert await breaker_state(http, two) == ("open", 1)
            answer = await ask(http, two, "chat", "main")
            assert answer.ok and answer.end["model"] == "spare"
            assert len(a.requests) == 2, "the other instance skips the route too"
            answer = await ask(http, two, "v1", "solo")
            assert answer.status == 503 and answer.error_code == "upstream_unavailable"
    finally:
        await delete_prefix(REDIS_URL, prefix)


# ---- 7. accounting -------------------------------------------------------------------------


async def stored(http, gw, answer) -> dict:
    """The assistant message the gateway stored for a /api/chat answer."""
    assert answer.stream is not None
    conversation = answer.stream.events[0].data["conversation_id"]
    async with http.get(f"{gw.base_url}/api/conversations/{conversation}") as r:
        message = (await r.json())["messages"][-1]
    assert message["role"] == "assistant"
    return message


async def settled(gw) -> None:
    """Every generation has ended and charged its tokens (once it has left the hub's
    table, its charge is done: the memory limiter charges without waiting)."""
    tasks = [g.task for g in gw.hub.generations.values() if g.task is not None]
    await asyncio.wait_for(asyncio.gather(*tasks), 10)


async def test_a_continued_answer_records_both_attempts_and_charges_all_it_generated(
    pair, http
):
    a, _ = pair
    a.script(reset_after(TOKENS, 4), continues(TOKENS))
    tables = [provider("primary", a, supports_prefill=True),
              model("main", "primary", "a-model", continue_after_cut=True)]
    # 8 tokens a minute: the 10 generated (4 counted + 6 the provider reported) overdraw
    # the bucket; charging only the last request's usage (6) would not.
    async with config_gateway(*tables, TOKENRELAY_TPM="8") as gw:
        answer = await ask(http, gw, "chat", "main")
        message = await stored(http, gw, answer)
        await settled(gw)
        async with http.post(gw.base_url + "/api/chat", json={
                "model": "main", "messages": [{"role": "user", "content": "again"}]}) as r:
            refused = (r.status, (await r.json())["error"])
        async with http.get(gw.base_url + "/api/stats") as r:
            stats = (await r.json())["models"]
    assert answer.ok and answer.text == TEXT
    first, second = message["attempts"]
    assert (first["route"], first["continuation"], first["status"], first["outcome"]) == (
        "main", False, 200, "upstream_incomplete")
    assert first["usage"] == {"prompt_tokens": None, "completion_tokens": 4,
                              "source": "counted"}
    assert (second["continuation"], second["status"], second["outcome"]) == (True, 200, "ok")
    assert second["usage"] == {"prompt_tokens": 5, "completion_tokens": 6,
                               "source": "provider"}
    assert second["started_ms"] >= first["started_ms"] + first["elapsed_ms"] - 1
    assert message["usage"]["completion_tokens"] == 10 and message["usage"]["estimated"]
    assert answer.end["usage"]["completion_tokens"] == 10
    assert answer.end["usage"]["source"] == "counted"
    assert refused[0] == 429 and refused[1]["limit"] == "tokens_per_minute"
    assert stats == [pytest.approx({**stats[0], "model": "main", "completion_tokens": 10})]


async def test_failed_attempts_that_generated_nothing_are_recorded_but_not_charged(pair, http):
    a, b = pair
    a.script(status(500))
    b.script(ok(TOKENS))
    tables = [provider("primary", a, attempts=2), provider("backup", b),
              model("main", "primary", "a-model", fallbacks=["spare"]),
              model("spare", "backup", "b-model")]
    async with config_gateway(*tables) as gw:
        answer = await ask(http, gw, "chat", "main")
        message = await stored(http, gw, answer)
    assert answer.ok
    attempts = message["attempts"]
    assert [(x["route"], x["status"], x["outcome"]) for x in attempts] == [
        ("main", 500, "upstream_error"), ("main", 500, "upstream_error"), ("spare", 200, "ok")]
    assert [x["usage"]["completion_tokens"] for x in attempts] == [0, 0, len(TOKENS)]
    assert message["usage"] == {"prompt_tokens": 5, "completion_tokens": len(TOKENS),
                                "estimated": False}


@pytest.mark.parametrize("surface", SURFACES)
async def test_an_explicit_zero_usage_is_never_replaced_by_an_estimate(pair, http, surface):
    a, _ = pair
    a.script(zero_usage(TOKENS))
    tables = [provider("primary", a), model("main", "primary", "a-model")]
    async with config_gateway(*tables) as gw:
        answer = await ask(http, gw, surface, "main")
        if surface == "chat":
            message = await stored(http, gw, answer)
            assert message["usage"] == {"prompt_tokens": 5, "completion_tokens": 0,
                                        "estimated": False}
            assert message["attempts"][0]["usage"]["source"] == "provider"
            assert answer.end["usage"]["completion_tokens"] == 0
    assert answer.ok and answer.text == TEXT


async def test_a_cancelled_answer_is_charged_what_it_generated(pair, http):
    a, _ = pair
    a.script(slow(TOKENS, 0.3))
    tables = [provider("primary", a), model("main", "primary", "a-model")]
    async with config_gateway(*tables) as gw:
        body = {"model": "main", "messages": [{"role": "user", "content": "q"}]}
        async with http.post(gw.base_url + "/api/chat", json=body) as r:
            stream = await read_stream(r, stop_after=4)  # start + 3 deltas
            stream_id = stream.events[0].data["stream_id"]
            async with http.post(f"{gw.base_url}/api/streams/{stream_id}/cancel") as c:
                assert c.status in (200, 202)
            rest = await read_stream(r)
        end = rest.events[-1]
        assert end.event == "done" and end.data["state"] == "cancelled"
        conversation = stream.events[0].data["conversation_id"]
        async with http.get(f"{gw.base_url}/api/conversations/{conversation}") as resp:
            message = (await resp.json())["messages"][-1]
        async with http.get(gw.base_url + "/api/stats") as resp:
            stats = (await resp.json())["models"]
    relayed = len(stream.text + rest.text)
    assert relayed and message["state"] == "cancelled"
    (attempt,) = message["attempts"]
    assert attempt["outcome"] == "cancelled"
    assert attempt["usage"]["source"] == "counted"
    assert attempt["usage"]["completion_tokens"] >= 3
    assert message["usage"]["completion_tokens"] == attempt["usage"]["completion_tokens"]
    assert stats[0]["completion_tokens"] == attempt["usage"]["completion_tokens"]


async def test_the_simulator_continues_its_own_dropped_answer_until_continuations_run_out(
    simulator, http
):
    sim, url = simulator
    tables = [provider("sim", SimpleNamespace(base_url=url), supports_prefill=True),
              model("drop", "sim", "sim-drop", continue_after_cut=True)]
    async with config_gateway(*tables) as gw:
        answer = await ask(http, gw, "chat", "drop", "tell me")
    full = build_text("sim-drop", [{"role": "user", "content": "tell me"}])
    per_attempt = 20  # sim-drop cuts every answer after 20 tokens
    attempts = 1 + MAX_CONTINUATIONS
    assert len(full) > per_attempt * attempts
    assert answer.text == "".join(full[: per_attempt * attempts])
    assert answer.stream is not None
    assert [e.data["attempt"] for e in answer.stream.named("continued")] == [2, 3, 4]
    assert answer.error_code == "upstream_incomplete"
    assert sim.stats.requests == attempts


async def test_a_continuation_asks_only_for_what_is_left_of_max_tokens(pair, http):
    a, _ = pair
    a.script(reset_after(TOKENS, 4), continues(TOKENS))
    tables = [provider("primary", a, supports_prefill=True),
              model("main", "primary", "a-model", continue_after_cut=True)]
    async with config_gateway(*tables) as gw:
        body = {"model": "main", "messages": [{"role": "user", "content": "q"}],
                "max_tokens": 50}
        async with http.post(gw.base_url + "/api/chat", json=body) as r:
            stream = await read_stream(r)
        assert stream.text == TEXT
        first, second = a.requests
        assert first.json["max_tokens"] == 50
        assert second.json["max_tokens"] == 50 - 4  # 4 tokens were generated before the cut

        # A cut at the limit itself is final: there is nothing left to ask for.
        a.script(reset_after(TOKENS, 4), continues(TOKENS))
        async with http.post(gw.base_url + "/api/chat", json={**body, "max_tokens": 4}) as r:
            stream = await read_stream(r)
        assert stream.events[-1].data["error"]["code"] == "upstream_incomplete"
        assert len(a.requests) == 3


async def test_a_silent_route_whose_fallback_is_paused_is_retried_like_a_single_route(
    pair, http
):
    a, b = pair
    a.script(stall_first())
    b.script(status(500))
    tables = [provider("primary", a, attempts=2),
              provider("backup", b, attempts=1, breaker={"failures": 1, "cooldown_s": 60}),
              model("main", "primary", "a-model", fallbacks=["spare"],
                    timeouts={"first_token": BUDGET}),
              model("spare", "backup", "b-model")]
    async with config_gateway(*tables) as gw:
        assert (await ask(http, gw, "chat", "spare")).error_code == "upstream_error"
        answer = await ask(http, gw, "chat", "main")  # the backup's breaker is open
    assert answer.error_code == "upstream_timeout"
    assert len(a.requests) == 2 and len(b.requests) == 1
    assert answer.stream is not None
    assert [e.data["reason"] for e in answer.stream.named("retry")] == ["upstream_timeout"]


async def test_a_fallback_that_fails_to_continue_is_not_named_as_the_answering_model(
    pair, http
):
    a, b = pair
    a.script(reset_after(TOKENS, 4), rejects_prefill(TOKENS))
    b.script(status(500))
    tables = [provider("primary", a), provider("backup", b, supports_prefill=True, attempts=1),
              model("main", "primary", "a-model", fallbacks=["spare"],
                    continue_after_cut=True),
              model("spare", "backup", "b-model")]
    async with config_gateway(*tables) as gw:
        answer = await ask(http, gw, "chat", "main")
        message = await stored(http, gw, answer)
    assert answer.error_code == "upstream_incomplete"
    assert answer.end["model"] == "main" and answer.end["models"] == ["main"]
    assert message["model_used"] == "main"
    assert [(x["route"], x["continuation"], x["status"]) for x in message["attempts"]] == [
        ("main", False, 200), ("spare", True, 500)]


@pytest.mark.parametrize(("flag", "last", "extra"), [
    ("", {}, {}),
    ("prefix", {"prefix": True}, {}),  # DeepSeek (beta), Mistral
    ("continue_final_message", {},  # vLLM
     {"continue_final_message": True, "add_generation_prompt": False}),
])
async def test_a_continuation_request_carries_the_providers_prefill_flag(
    pair, http, flag, last, extra
):
    a, _ = pair
    a.script(reset_after(TOKENS, 4), continues(TOKENS))
    tables = [provider("primary", a, supports_prefill=True, prefill_flag=flag),
              model("main", "primary", "a-model", continue_after_cut=True)]
    async with config_gateway(*tables) as gw:
        answer = await ask(http, gw, "chat", "main")
    assert answer.ok and answer.text == TEXT
    first, second = (r.json for r in a.requests)
    assert second["messages"][-1] == {"role": "assistant", "content": "".join(TOKENS[:4]),
                                      **last}
    assert {k: second[k] for k in extra} == extra
    assert not any(k in first for k in ("continue_final_message", "add_generation_prompt"))


async def test_breaker_states_stay_out_of_the_public_config_when_keys_are_required(
    pair, http
):
    a, b = pair
    key = "test-key-i15-0123"
    token = "metrics-token-i15-0123"  # with client keys, /metrics wants its own token
    async with config_gateway(*breaker_routes(a, b), TOKENRELAY_API_KEYS=f"t:{key}",
                              TOKENRELAY_METRICS_TOKEN=token) as gw:
        async with http.get(gw.base_url + "/api/config") as r:
            public = await r.json()
        async with http.get(gw.base_url + "/metrics",
                            headers={"Authorization": f"Bearer {token}"}) as r:
            metrics = await r.text()
    assert public["auth_required"] is True and "breakers" not in public
    assert "tokenrelay_circuit_breaker_state" in metrics
