"""Sign-in through the team's auth proxy: ``trusted_user_header`` from ``trusted_proxies``
(issue 16, point 5), over real HTTP. nginx with auth_request in front: test_nginx_auth.py."""

from __future__ import annotations

import logging

import pytest

from support.client import chat_body, read_stream

HEADER = "X-Forwarded-User"
ALICE = {HEADER: "alice@example.com"}
BOB = {HEADER: "bob"}
TRUSTED = {"TOKENRELAY_TRUSTED_USER_HEADER": HEADER, "TOKENRELAY_TRUSTED_PROXIES": "127.0.0.1",
           "TOKENRELAY_SIGN_OUT_URL": "/oauth2/sign_out"}


async def test_proxy_users_are_tenants_isolated_from_each_other(gateway_factory, http):
    async with gateway_factory(**TRUSTED, TOKENRELAY_GRACE_S="30") as gw:
        base = gw.base_url
        body = chat_body("mine", sim={"tokens_per_s": 100, "tokens": 30})
        async with http.post(base + "/api/chat", json=body, headers=ALICE) as r:
            assert r.status == 200
            stream_id = r.headers["X-Stream-Id"]
            conversation_id = r.headers["X-Conversation-Id"]
            await read_stream(r, stop_after=2)
            for method, path in (("GET", f"/api/streams/{stream_id}"),
                                 ("GET", f"/api/streams/{stream_id}/events"),
                                 ("POST", f"/api/streams/{stream_id}/cancel"),
                                 ("GET", f"/api/conversations/{conversation_id}"),
                                 ("DELETE", f"/api/conversations/{conversation_id}")):
                async with http.request(method, base + path, headers=BOB) as other:
                    assert other.status == 404, (method, path)
            rest = await read_stream(r)
        assert rest.events[-1].data["state"] == "complete"  # bob's cancel did nothing
        info = await gw.hub.journal.info(stream_id)
        assert info.meta["owner"] == "user:alice@example.com"
        async with http.get(base + "/api/conversations", headers=BOB) as r:
            assert (await r.json())["conversations"] == []
        async with http.get(base + "/api/conversations", headers=ALICE) as r:
            assert [c["id"] for c in (await r.json())["conversations"]] == [conversation_id]
        # idempotency keys are per tenant too
        idem = {"Idempotency-Key": "same-key-1"}
        streams = []
        for who in (ALICE, BOB):
            async with http.post(base + "/api/chat", json=chat_body("x", sim={"tokens": 2}),
                                 headers={**who, **idem}) as r:
                assert "Idempotent-Replayed" not in r.headers
                streams.append(r.headers["X-Stream-Id"])
                await read_stream(r)
        assert streams[0] != streams[1]
        # the page learns who is signed in, and needs no key
        async with http.get(base + "/api/config", headers=ALICE) as r:
            config = await r.json()
        assert config["user"] == "alice@example.com"
        assert config["sign_out_url"] == "/oauth2/sign_out"
        assert config["auth_required"] is False
        # without the proxy's header there is nobody: sign in or bring a key
        async with http.get(base + "/api/conversations") as r:
            assert r.status == 401
            assert "auth proxy" in (await r.json())["error"]["message"]
        async with http.get(base + "/api/config") as r:
            assert (await r.json())["auth_required"] is True


async def test_rate_limits_are_per_proxy_user(gateway_factory, http):
    async with gateway_factory(**TRUSTED, TOKENRELAY_RPM="1") as gw:
        for who, status in ((ALICE, 200), (ALICE, 429), (BOB, 200)):
            async with http.post(gw.base_url + "/api/chat", json=chat_body(
                    "x", sim={"tokens": 2}), headers=who) as r:
                assert r.status == status, who
                await r.read()


async def test_the_header_from_an_untrusted_address_is_ignored_and_logged_once(
    gateway_factory, http, caplog
):
    caplog.set_level(logging.WARNING, logger="tokenrelay.access")
    async with gateway_factory(TOKENRELAY_TRUSTED_USER_HEADER=HEADER,
                               TOKENRELAY_TRUSTED_PROXIES="10.0.0.0/8,::1",
                               TOKENRELAY_API_KEYS="carol:carol-key-0123456789") as gw:
        carol = {"Authorization": "Bearer carol-key-0123456789"}
        for _ in range(3):  # 127.0.0.1 is not a trusted proxy here
            async with http.get(gw.base_url + "/api/conversations", headers=BOB) as r:
                assert r.status == 401
        async with http.post(gw.base_url + "/api/chat", json=chat_body("x", sim={"tokens": 2}),
                             headers={**BOB, **carol}) as r:
            assert r.status == 200
            stream_id = r.headers["X-Stream-Id"]
            await read_stream(r)
        assert (await gw.hub.journal.info(stream_id)).meta["owner"] == "key:carol"
    warnings = [rec.getMessage() for rec in caplog.records
                if "not in trusted_proxies" in rec.getMessage()]
    assert len(warnings) == 1 and "127.0.0.1" in warnings[0]


async def test_keys_and_proxy_users_combine(gateway_factory, http):
    async with gateway_factory(**TRUSTED,
                               TOKENRELAY_API_KEYS="ci:ci-key-0123456789,ops:ops-key-0123456789",
                               TOKENRELAY_ADMIN_KEYS="ops") as gw:
        owners = {}
        for name, headers in (("key", {"Authorization": "Bearer ci-key-0123456789"}),
                              ("user", ALICE),
                              # a proxy's basic credentials pass through: the user wins
                              ("both", {**ALICE, "Authorization": "Basic YWxpY2U6cHc="})):
            async with http.post(gw.base_url + "/api/chat", json=chat_body(
                    "x", sim={"tokens": 2}), headers=headers) as r:
                assert r.status == 200, name
                stream_id = r.headers["X-Stream-Id"]
                await read_stream(r)
            owners[name] = (await gw.hub.journal.info(stream_id)).meta["owner"]
        assert owners == {"key": "key:ci", "user": "user:alice@example.com",
                          "both": "user:alice@example.com"}


@pytest.mark.parametrize("headers", [
    [(HEADER, "alice"), (HEADER, "bob")],  # one may be the client's own, passed through
    [(HEADER, "alice smith")],
    [(HEADER, "x" * 201)],
    [(HEADER, "")],
])
async def test_a_malformed_user_header_from_the_proxy_is_a_clear_400(gateway_factory, http,
                                                                     headers):
    async with gateway_factory(**TRUSTED) as gw:
        async with http.get(gw.base_url + "/api/conversations", headers=headers) as r:
            assert r.status == 400
            error = (await r.json())["error"]
            assert error["code"] == "invalid_user_header" and HEADER in error["message"]
