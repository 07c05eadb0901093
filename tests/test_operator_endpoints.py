"""Operator endpoints (issue 16, point 6): ``/metrics`` behind ``metrics_token`` or local
only, and ``/api/stats`` scoped to the caller's tenant unless it holds an admin key."""

from __future__ import annotations

from support.client import chat_body, read_stream

KEYS = "alice:alice-key-0123456789,bob:bob-key-0123456789,ops:ops-key-0123456789"
ALICE = {"Authorization": "Bearer alice-key-0123456789"}
BOB = {"Authorization": "Bearer bob-key-0123456789"}
OPS = {"Authorization": "Bearer ops-key-0123456789"}
TOKEN = "metrics-token-0123456789"


async def test_metrics_on_a_local_gateway_are_for_loopback_clients_only(gateway, http):
    async with http.get(gateway.base_url + "/metrics") as r:
        assert r.status == 200
        assert "tokenrelay_open_streams" in await r.text()
    # The test server believes X-Forwarded-For from loopback (uvicorn's default; `tokenrelay
    # serve` turns that off): the way to make a request come from elsewhere here.
    async with http.get(gateway.base_url + "/metrics",
                        headers={"X-Forwarded-For": "203.0.113.7"}) as r:
        assert r.status == 403
        error = (await r.json())["error"]
        assert error["code"] == "metrics_forbidden" and "metrics_token" in error["message"]


async def test_metrics_with_keys_need_the_metrics_token(gateway_factory, http):
    async with gateway_factory(TOKENRELAY_API_KEYS=KEYS) as gw:
        async with http.get(gw.base_url + "/metrics", headers=ALICE) as r:
            assert r.status == 403  # a tenant's key is not enough, and there is no token
            assert "TOKENRELAY_METRICS_TOKEN" in (await r.json())["error"]["message"]
    async with gateway_factory(TOKENRELAY_API_KEYS=KEYS, TOKENRELAY_METRICS_TOKEN=TOKEN) as gw:
        for headers in ({}, ALICE, {"Authorization": "Bearer " + TOKEN[:-1]},
                        {"Authorization": "Basic " + TOKEN}):
            async with http.get(gw.base_url + "/metrics", headers=headers) as r:
                assert r.status == 401, headers
                assert TOKEN not in await r.text()
        auth = {"Authorization": "Bearer " + TOKEN}
        async with http.get(gw.base_url + "/metrics", headers=auth) as r:
            assert r.status == 200
            assert "tokenrelay_streams" in await r.text()
        async with http.get(gw.base_url + "/metrics", headers={
                **auth, "X-Forwarded-For": "203.0.113.7"}) as r:
            assert r.status == 200  # with the token, from anywhere
        async with http.get(gw.base_url + "/api/models", headers=auth) as r:
            assert r.status == 401  # the metrics token is not a client key


async def _chat(gw, http, headers, model):
    async with http.post(gw.base_url + "/api/chat", json=chat_body(
            "x", model, sim={"tokens": 3}), headers=headers) as r:
        assert r.status == 200
        gen = gw.hub.generations.get(r.headers["X-Stream-Id"])
        await read_stream(r)
    if gen is not None:
        await gen.finished.wait()  # stored by then


async def test_stats_show_the_callers_own_answers_unless_an_admin_key(gateway_factory, http):
    async with gateway_factory(TOKENRELAY_API_KEYS=KEYS, TOKENRELAY_ADMIN_KEYS="ops") as gw:
        await _chat(gw, http, ALICE, "sim-chat")
        await _chat(gw, http, ALICE, "sim-chat")
        await _chat(gw, http, BOB, "sim-fast")
        seen = {}
        for name, headers in (("alice", ALICE), ("bob", BOB), ("ops", OPS)):
            async with http.get(gw.base_url + "/api/stats", headers=headers) as r:
                assert r.status == 200
                seen[name] = {m["model"]: m["count"] for m in (await r.json())["models"]}
        assert seen == {"alice": {"sim-chat": 2}, "bob": {"sim-fast": 1},
                        "ops": {"sim-chat": 2, "sim-fast": 1}}
