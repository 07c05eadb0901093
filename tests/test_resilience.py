"""Upstream resilience against the simulator's misbehaving models and a dead port."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson

from support.client import chat_body, read_stream
from support.gateway import running_gateway
from tokenrelay.simulator import build_text

FAST_RETRY = {
    "TOKENRELAY_RETRY_BASE_DELAY_S": "0.01",
    "TOKENRELAY_RETRY_MAX_DELAY_S": "0.05",
}


async def test_rate_limited_upstream_is_waited_out_and_announced(simulator, gateway, http):
    sim, _ = simulator
    started = time.monotonic()
    async with http.post(gateway.base_url + "/api/chat", json=chat_body("flaky", "sim-flaky")) as r:
        stream = await read_stream(r)
    elapsed = time.monotonic() - started
    retries = stream.named("retry")
    assert len(retries) == 1
    retry = retries[0].data
    assert retry["reason"] == "upstream_rate_limited" and retry["status"] == 429
    assert retry["wait_ms"] == 1000  # the simulator's Retry-After: 1
    assert "content" not in retry
    assert stream.events[-1].data["state"] == "complete"
    assert stream.text == "".join(build_text("sim-flaky", chat_body("flaky")["messages"]))
    assert sim.stats.requests == 2
    assert elapsed >= 1.0  # never sooner than Retry-After


async def test_drop_after_tokens_ends_with_an_error_and_keeps_the_text(gateway, http):
    async with http.post(gateway.base_url + "/api/chat", json=chat_body("drop", "sim-drop")) as r:
        stream = await read_stream(r)
    assert len(stream.terminal) == 1
    end = stream.events[-1]
    assert end.event == "error" and end.data["state"] == "error"
    assert end.data["error"]["code"] == "upstream_incomplete"
    assert end.data["error"]["retryable"] is True
    full = "".join(build_text("sim-drop", chat_body("drop")["messages"]))
    assert stream.text and full.startswith(stream.text) and stream.text != full
    assert not stream.named("retry")  # text was relayed: never restarted


async def test_silent_upstream_mid_answer_is_a_timeout_not_a_hang(simulator, gateway_factory, http):
    sim, _ = simulator
    async with gateway_factory(TOKENRELAY_IDLE_TIMEOUT_S="0.3") as gw:
        async with http.post(gw.base_url + "/api/chat", json=chat_body("s", "sim-stall")) as r:
            stream = await read_stream(r)
    end = stream.events[-1]
    assert end.event == "error" and end.data["error"]["code"] == "upstream_timeout"
    assert "idle" in end.data["error"]["message"]
    assert stream.text
    await asyncio.wait_for(sim.wait_disconnected(1), 10)  # and the upstream was hung up on


async def test_first_token_budget_is_retried_then_reported(simulator, gateway_factory, http):
    sim, _ = simulator
    env = {
        "TOKENRELAY_FIRST_TOKEN_TIMEOUT_S": "0.2",
        "TOKENRELAY_RETRY_MAX_ATTEMPTS": "2",
        **FAST_RETRY,
    }
    async with gateway_factory(**env) as gw:
        body = chat_body("slow", sim={"first_token_delay_s": 30})
        async with http.post(gw.base_url + "/api/chat", json=body) as r:
            stream = await read_stream(r)
    assert [e.data["reason"] for e in stream.named("retry")] == ["upstream_timeout"]
    end = stream.events[-1]
    assert end.event == "error" and end.data["error"]["code"] == "upstream_timeout"
    assert "first_token" in end.data["error"]["message"]
    await asyncio.wait_for(sim.wait_disconnected(2), 10)


async def test_refused_connection_is_retried_then_reported(http, refused_port):
    env = {
        "TOKENRELAY_UPSTREAM_URL": f"http://127.0.0.1:{refused_port}/v1",
        "TOKENRELAY_RETRY_MAX_ATTEMPTS": "3",
        **FAST_RETRY,
    }
    async with running_gateway(**env) as gw:
        async with http.post(gw.base_url + "/api/chat", json=chat_body("x", "any")) as r:
            stream = await read_stream(r)
    retries = stream.named("retry")
    assert [e.data["attempt"] for e in retries] == [1, 2]
    assert all(e.data["reason"] == "upstream_unavailable" for e in retries)
    end = stream.events[-1]
    assert end.event == "error" and end.data["error"]["code"] == "upstream_unavailable"
    assert len(stream.terminal) == 1


async def test_client_errors_are_not_retried(simulator, gateway, http):
    sim, _ = simulator
    async with http.post(gateway.base_url + "/api/chat", json=chat_body("x", "no-such-model")) as r:
        stream = await read_stream(r)
    end = stream.events[-1]
    assert end.event == "error" and end.data["error"]["code"] == "upstream_rejected"
    assert "no-such-model" in end.data["error"]["message"]  # the provider's own words
    assert not stream.named("retry")
    assert sim.stats.requests == 1


async def test_fallback_chain_answers_with_the_next_model(
    simulator, tmp_path: Path, http, refused_port
):
    _, url = simulator
    config = tmp_path / "tokenrelay.toml"
    config.write_text(
        f"""
[providers.dead]
base_url = "http://127.0.0.1:{refused_port}/v1"
retry = {{ max_attempts = 2, base_delay = 0.01, max_delay = 0.02 }}

[providers.sim]
base_url = "{url}"

[models.primary]
provider = "dead"
upstream_model = "big-model"
fallbacks = ["backup"]

[models.backup]
provider = "sim"
upstream_model = "sim-chat"
""",
        encoding="utf-8",
    )
    async with running_gateway(TOKENRELAY_CONFIG=str(config)) as gw:
        async with http.post(gw.base_url + "/api/chat", json=chat_body("fb", "primary")) as r:
            stream = await read_stream(r)
    assert stream.events[0].data["model"] == "primary"
    reasons = [e.data["reason"] for e in stream.named("retry")]
    assert reasons == ["upstream_unavailable", "fallback"]
    assert stream.named("retry")[-1].data["next_model"] == "backup"
    done = stream.events[-1]
    assert done.event == "done" and done.data["model"] == "backup"
    assert stream.text == "".join(build_text("sim-chat", chat_body("fb")["messages"]))


async def test_idempotency_key_attaches_instead_of_generating_twice(simulator, gateway, http):
    sim, _ = simulator
    body = chat_body("only once", sim={"tokens_per_s": 200})
    headers = {"Idempotency-Key": "req-123"}
    url = gateway.base_url + "/api/chat"
    async with http.post(url, json=body, headers=headers) as first:
        async with http.post(url, json=body, headers=headers) as second:
            assert second.headers["X-Stream-Id"] == first.headers["X-Stream-Id"]
            a, b = await asyncio.gather(read_stream(first), read_stream(second))
    assert a.text == b.text == "".join(build_text("sim-chat", body["messages"]))
    assert sim.stats.requests == 1
    changed = {**body, "messages": [{"role": "user", "content": "something else"}]}
    async with http.post(url, data=orjson.dumps(changed),
                         headers={**headers, "Content-Type": "application/json"}) as r:
        assert r.status == 422
        assert (await r.json())["error"]["code"] == "idempotency_key_reused"
