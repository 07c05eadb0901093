"""API keys, request ids, the access log, nosniff and CORS over real HTTP."""

from __future__ import annotations

import logging
import subprocess
import sys

from support.client import chat_body, read_stream

KEYS = "alice:alice-key-0123456789,bob:bob-key-0123456789"
ALICE = {"Authorization": "Bearer alice-key-0123456789"}


async def test_without_keys_everything_is_open_to_the_local_user(gateway, http):
    async with http.get(gateway.base_url + "/api/config") as r:
        assert (await r.json())["auth_required"] is False
    async with http.post(gateway.base_url + "/api/chat", json=chat_body("hi")) as r:
        assert r.status == 200
        await read_stream(r)


async def test_keys_are_required_on_api_and_v1(gateway_factory, http):
    async with gateway_factory(TOKENRELAY_API_KEYS=KEYS) as gw:
        requests = [
            ("POST", "/api/chat"),
            ("GET", "/api/models"),
            ("GET", "/api/streams/whatever"),
            ("GET", "/api/streams/whatever/events"),
            ("POST", "/api/streams/whatever/cancel"),
            ("GET", "/api/conversations"),
            ("POST", "/v1/chat/completions"),
            ("GET", "/v1/models"),
            ("GET", "/api/no-such-route"),  # no probing of routes either
        ]
        wrong = [
            {},
            {"Authorization": "Bearer nope-nope-nope"},
            {"Authorization": "Bearer alice-key-012345678"},  # a prefix of a real key
            {"Authorization": "Bearer alice-key-0123456789x"},
            {"Authorization": "Basic YWxpY2U6YWxpY2Uta2V5LTAxMjM0NTY3ODk="},
            {"Authorization": "alice-key-0123456789"},
            {"Authorization": "Bearer "},
            {"X-Api-Key": "alice-key-0123456789"},
        ]
        for method, path in requests:
            for headers in wrong:
                async with http.request(method, gw.base_url + path, headers=headers,
                                        json=chat_body("x")) as r:
                    assert r.status == 401, (method, path, headers)
                    assert r.headers["WWW-Authenticate"].startswith("Bearer")
                    assert r.headers["X-Content-Type-Options"] == "nosniff"
                    error = (await r.json())["error"]
                    assert error["code"] == "unauthorized" and error["message"]
        async with http.get(gw.base_url + "/api/config") as r:  # the page learns it
            assert r.status == 200 and (await r.json())["auth_required"] is True
        for path in ("/", "/healthz"):
            async with http.get(gw.base_url + path) as r:
                assert r.status == 200
        async with http.get(gw.base_url + "/api/models", headers=ALICE) as r:
            assert r.status == 200
        async with http.post(gw.base_url + "/api/chat", json=chat_body("hi"),
                             headers={"Authorization": "bearer alice-key-0123456789"}) as r:
            assert r.status == 200  # the scheme is case-insensitive
            stream = await read_stream(r)
        assert stream.events[-1].data["state"] == "complete"


async def test_a_bad_key_is_told_apart_from_a_missing_one(gateway_factory, http):
    async with gateway_factory(TOKENRELAY_API_KEYS=KEYS) as gw:
        async with http.get(gw.base_url + "/v1/models") as r:
            assert "invalid_token" not in r.headers["WWW-Authenticate"]
        async with http.get(gw.base_url + "/v1/models",
                            headers={"Authorization": "Bearer wrong-key-99999"}) as r:
            assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
            assert "wrong-key-99999" not in await r.text()


async def test_streams_pass_through_the_middleware_unbuffered(gateway_factory, http):
    # The start event must arrive while the upstream has not answered yet.
    async with gateway_factory(TOKENRELAY_API_KEYS=KEYS, TOKENRELAY_CORS_ORIGINS=
                               "https://chat.example") as gw:
        body = chat_body("slow", sim={"first_token_delay_s": 30})
        async with http.post(gw.base_url + "/api/chat", json=body, headers=ALICE) as r:
            first = await read_stream(r, stop_after=1)
            assert first.events[0].event == "start"
            stream_id = r.headers["X-Stream-Id"]
            async with http.post(f"{gw.base_url}/api/streams/{stream_id}/cancel",
                                 headers=ALICE) as c:
                assert c.status == 202
            rest = await read_stream(r)
        assert rest.events[-1].data["state"] == "cancelled"


async def test_request_ids_and_nosniff_on_every_response(gateway_factory, http):
    async with gateway_factory(TOKENRELAY_API_KEYS=KEYS) as gw:
        seen = set()
        for path in ("/", "/healthz", "/api/config", "/static/nope.js", "/api/models"):
            async with http.get(gw.base_url + path) as r:
                assert r.headers["X-Content-Type-Options"] == "nosniff", path
                seen.add(r.headers["X-Request-Id"])
        assert len(seen) == 5
        async with http.get(gw.base_url + "/healthz",
                            headers={"X-Request-Id": "trace-abc.123"}) as r:
            assert r.headers["X-Request-Id"] == "trace-abc.123"
        for hostile in ("a b", "x" * 65, "é", "a;b=c"):
            async with http.get(gw.base_url + "/healthz",
                                headers={"X-Request-Id": hostile}) as r:
                rid = r.headers["X-Request-Id"]
                assert rid != hostile and len(rid) == 16
        async with http.get(gw.base_url + "/") as r:  # the page keeps its own headers
            assert r.headers["Content-Security-Policy"].startswith("default-src 'self'")
            assert r.headers.getall("X-Content-Type-Options") == ["nosniff"]


async def test_access_log_names_the_key_never_the_secret(gateway_factory, http, caplog):
    caplog.set_level(logging.INFO, logger="tokenrelay.access")
    async with gateway_factory(TOKENRELAY_API_KEYS=KEYS) as gw:
        url = gw.base_url + "/api/chat?token=query-secret-123"
        async with http.post(url, json=chat_body("hi", sim={"tokens": 2}), headers={
            **ALICE, "X-Request-Id": "rid-1", "Cookie": "session=cookie-secret-456",
        }) as r:
            await read_stream(r)
        async with http.get(gw.base_url + "/v1/models",
                            headers={"Authorization": "Bearer wrong-key-99999"}) as r:
            assert r.status == 401
        async with http.get(gw.base_url + "/api/streams/a%0Aforged%20line/events",
                            headers=ALICE) as r:
            assert r.status == 404
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "tokenrelay.access"]
    chat = [line for line in lines if "rid=rid-1" in line]
    assert len(chat) == 1
    method, path, status, duration, key, _rid = chat[0].split(" ")
    assert (method, path, status, key) == ("POST", "/api/chat", "200", "key=alice")
    assert duration.endswith("ms")
    assert any(line.startswith("GET /v1/models 401 ") and "key=-" in line for line in lines)
    forged = [line for line in lines if "forged" in line]
    assert forged and all("\n" not in line for line in forged)
    text = "\n".join(lines)
    for secret in ("alice-key-0123456789", "wrong-key-99999", "query-secret-123",
                   "cookie-secret-456", "token="):
        assert secret not in text


async def test_cors_is_off_by_default(gateway, http):
    headers = {"Origin": "https://evil.example"}
    async with http.get(gateway.base_url + "/api/models", headers=headers) as r:
        assert "Access-Control-Allow-Origin" not in r.headers
    async with http.options(gateway.base_url + "/api/chat", headers={
        **headers, "Access-Control-Request-Method": "POST",
    }) as r:
        assert "Access-Control-Allow-Origin" not in r.headers


async def test_cors_allows_only_listed_origins(gateway_factory, http):
    async with gateway_factory(TOKENRELAY_API_KEYS=KEYS,
                               TOKENRELAY_CORS_ORIGINS="https://chat.example") as gw:
        preflight = {
            "Origin": "https://chat.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, last-event-id",
        }
        async with http.options(gw.base_url + "/api/chat", headers=preflight) as r:
            assert r.status == 200  # no key needed for a preflight
            assert r.headers["Access-Control-Allow-Origin"] == "https://chat.example"
            assert "authorization" in r.headers["Access-Control-Allow-Headers"].lower()
            assert "Access-Control-Allow-Credentials" not in r.headers
        evil = {**preflight, "Origin": "https://evil.example"}
        async with http.options(gw.base_url + "/api/chat", headers=evil) as r:
            assert r.status == 403  # refused before CORS (tokenrelay.guard)
            assert "Access-Control-Allow-Origin" not in r.headers
        origin = {"Origin": "https://chat.example"}
        async with http.get(gw.base_url + "/api/models", headers=origin) as r:
            assert r.status == 401  # the error is readable by the allowed page
            assert r.headers["Access-Control-Allow-Origin"] == "https://chat.example"
        async with http.post(gw.base_url + "/api/chat", json=chat_body("x", sim={"tokens": 2}),
                             headers={**origin, **ALICE}) as r:
            assert r.headers["Access-Control-Allow-Origin"] == "https://chat.example"
            assert "X-Stream-Id" in r.headers["Access-Control-Expose-Headers"]
            await read_stream(r)
        async with http.get(gw.base_url + "/api/models",
                            headers={"Origin": "https://evil.example", **ALICE}) as r:
            assert "Access-Control-Allow-Origin" not in r.headers


def test_the_middleware_module_loads_no_response_or_stream_module():
    """It reads the scope extensions from tokenrelay.asgi (issue 18): importing it must
    not pull in the subscriber, and with it the hub and the generation."""
    code = ("import sys, tokenrelay.middleware; "
            "print(sorted(m for m in sys.modules if m.startswith('tokenrelay.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)
    loaded = result.stdout
    assert "'tokenrelay.asgi'" in loaded
    for module in ("subscriber", "hub", "generation", "protocol"):
        assert f"'tokenrelay.{module}'" not in loaded
