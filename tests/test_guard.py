"""tokenrelay.guard over real HTTP: cross-site requests, content types and Host names
(issue 16, points 1 and 2). Refusals must come before any upstream call or stored row."""

from __future__ import annotations

import logging

import orjson
import pytest

from support.client import chat_body, read_stream
from support.fault_upstream import FaultUpstream, ok
from tokenrelay.guard import HostPolicy

EVIL = "https://evil.example"


def _port(gw) -> int:
    return int(gw.base_url.rsplit(":", 1)[1])


async def _nothing_happened(gw, http, up: FaultUpstream) -> None:
    assert up.requests == []  # nothing reached the upstream
    assert not gw.hub.generations
    async with http.get(gw.base_url + "/api/conversations") as r:
        assert (await r.json())["conversations"] == []  # nothing stored


async def test_cross_site_and_non_json_bodies_are_refused_before_any_work(gateway_factory, http):
    async with FaultUpstream() as up:
        up.script(ok(["fine"]))
        async with gateway_factory(TOKENRELAY_UPSTREAM_URL=up.base_url) as gw:
            body = orjson.dumps(chat_body("spend their key", "m"))
            cases = [
                # what a page on another site can send without a CORS preflight
                ({"Content-Type": "text/plain", "Origin": EVIL,
                  "Sec-Fetch-Site": "cross-site"}, body, 403, "origin_not_allowed"),
                ({"Content-Type": "application/x-www-form-urlencoded", "Origin": EVIL},
                 b"messages=x", 403, "origin_not_allowed"),
                ({"Content-Type": "multipart/form-data; boundary=x", "Origin": "null"},
                 body, 403, "origin_not_allowed"),
                # a browser that sent no Origin but says the page was another site's
                ({"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"},
                 body, 403, "cross_site_request"),
                # same-origin or no browser at all, but not JSON
                ({"Content-Type": "text/plain"}, body, 415, "unsupported_media_type"),
                ({"Content-Type": "application/x-www-form-urlencoded"}, body, 415,
                 "unsupported_media_type"),
                ({"Content-Type": "application/jsonp"}, body, 415, "unsupported_media_type"),
                ({}, body, 415, "unsupported_media_type"),
            ]
            for path in ("/api/chat", "/v1/chat/completions", "/v1/responses", "/api/nope"):
                for headers, data, status, code in cases:
                    # (aiohttp would add application/octet-stream to a bare body)
                    async with http.post(gw.base_url + path, data=data, headers=headers,
                                         skip_auto_headers=["Content-Type"]) as r:
                        assert r.status == status, (path, headers, await r.text())
                        assert r.headers["Content-Type"] == "application/json"
                        error = (await r.json())["error"]
                        assert error["code"] == code, (path, headers, error)
                        assert "content-type" in error["message"].lower() or \
                            "cors_origins" in error["message"]  # says what to change
            await _nothing_happened(gw, http, up)
            # The same request as the page or an SDK sends it goes through.
            own = f"http://127.0.0.1:{_port(gw)}"
            page = {"Content-Type": "application/json; charset=utf-8", "Origin": own,
                    "Sec-Fetch-Site": "same-origin"}
            for headers in (page, {"Content-Type": "Application/JSON"}):
                async with http.post(gw.base_url + "/api/chat", data=body, headers=headers) as r:
                    assert r.status == 200, await r.text()
                    assert (await read_stream(r)).text == "fine"
            assert len(up.requests) == 2


async def test_bodiless_posts_and_deletes_need_no_content_type(gateway_factory, http):
    async with gateway_factory() as gw:
        body = chat_body("slow", sim={"first_token_delay_s": 30})
        async with http.post(gw.base_url + "/api/chat", json=body) as r:
            stream_id = r.headers["X-Stream-Id"]
            conversation_id = r.headers["X-Conversation-Id"]
            await read_stream(r, stop_after=1)
            # as the page's fetch(url, {method: "POST"}) and the SDKs send a cancel
            async with http.post(f"{gw.base_url}/api/streams/{stream_id}/cancel",
                                 headers={"Content-Length": "0"}) as c:
                assert c.status == 202, await c.text()
            assert (await read_stream(r)).events[-1].data["state"] == "cancelled"
        url = f"{gw.base_url}/api/conversations/{conversation_id}"
        async with http.patch(url, data=b'{"title": "t"}',
                              headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 415
        async with http.patch(url, json={"title": "renamed"}) as r:
            assert r.status == 200 and (await r.json())["title"] == "renamed"
        async with http.delete(url) as r:
            assert r.status == 204


async def test_origin_checks_leave_the_page_cors_origins_and_other_paths_alone(
    gateway_factory, http
):
    async with gateway_factory(TOKENRELAY_CORS_ORIGINS="https://chat.example") as gw:
        port = _port(gw)
        for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}",
                       "https://chat.example"):
            host = origin.removeprefix("http://") if "chat" not in origin else None
            headers = {"Origin": origin, **({"Host": host} if host else {})}
            async with http.get(gw.base_url + "/api/models", headers=headers) as r:
                assert r.status == 200, (origin, await r.text())
        # A page on another port of the same host is another origin.
        other = {"Origin": f"http://127.0.0.1:{port + 1}"}
        async with http.get(gw.base_url + "/api/models", headers=other) as r:
            assert r.status == 403
        # A link followed from another site still opens the page itself.
        async with http.get(gw.base_url + "/", headers={"Sec-Fetch-Site": "cross-site"}) as r:
            assert r.status == 200
        async with http.get(gw.base_url + "/metrics", headers={"Origin": EVIL}) as r:
            assert r.status == 403


async def test_a_forged_host_is_refused_and_the_gateway_names_are_served(gateway_factory, http):
    async with FaultUpstream() as up:
        up.script(ok(["fine"]))
        async with gateway_factory(TOKENRELAY_UPSTREAM_URL=up.base_url) as gw:
            port = _port(gw)
            for host in (f"evil.example:{port}", "evil.example", f"localhost.evil.example:{port}",
                         f"127.0.0.2:{port}", f"10.0.0.1:{port}", ""):
                for method, path in (("POST", "/api/chat"), ("GET", "/api/conversations"),
                                     ("GET", "/"), ("GET", "/v1/models")):
                    async with http.request(method, gw.base_url + path, headers={"Host": host},
                                            json=chat_body("x", "m")) as r:
                        assert r.status == 421, (host, path, r.status)
                        error = (await r.json())["error"]
                        assert error["code"] == "host_not_allowed"
                        assert "allowed_hosts" in error["message"] or not host
            async with http.get(gw.base_url + "/healthz", headers={"Host": "lb-probe"}) as r:
                assert r.status == 200  # health checks probe by any name
            assert up.requests == []
            for host in (f"localhost:{port}", f"LOCALHOST:{port}", f"127.0.0.1:{port}",
                         f"[::1]:{port}", "localhost"):
                async with http.post(gw.base_url + "/api/chat", json=chat_body("x", "m"),
                                     headers={"Host": host}) as r:
                    assert r.status == 200, host
                    await read_stream(r)


async def test_allowed_hosts_adds_names_and_a_star_serves_any_with_a_warning(
    gateway_factory, http, caplog
):
    async with gateway_factory(TOKENRELAY_ALLOWED_HOSTS="chat.example,other.example:8443") as gw:
        for host, status in (("chat.example", 200), ("chat.example:8000", 200),
                             ("other.example:8443", 200), ("other.example", 421),
                             ("evil.example", 421), (f"127.0.0.1:{_port(gw)}", 200)):
            async with http.get(gw.base_url + "/api/models", headers={"Host": host}) as r:
                assert r.status == status, host
    caplog.set_level(logging.WARNING, logger="tokenrelay")
    async with gateway_factory(TOKENRELAY_ALLOWED_HOSTS="*") as gw:
        async with http.get(gw.base_url + "/api/models", headers={"Host": "any.example"}) as r:
            assert r.status == 200
    assert any("allowed_hosts is '*'" in rec.getMessage() for rec in caplog.records)


@pytest.mark.parametrize(("allowed", "host", "server", "expected"), [
    ((), "localhost:8000", ("127.0.0.1", 8000), True),
    ((), "[::1]:8000", ("::1", 8000), True),
    ((), "localhost:8000", ("10.0.0.5", 8000), False),  # bound elsewhere: not loopback names
    ((), "10.0.0.5:8000", ("10.0.0.5", 8000), True),  # the address it was reached on
    ((), "[fd00::5]:8000", ("fd00::5", 8000), True),
    ((), "10.0.0.6:8000", ("10.0.0.5", 8000), False),
    ((), "chat.example", ("10.0.0.5", 8000), False),
    (("chat.example",), "chat.example", ("10.0.0.5", 8000), True),
    (("chat.example",), "chat.example.", ("10.0.0.5", 8000), False),
    ((), "localhost:8000", ("::ffff:127.0.0.1", 8000), True),  # IPv4 on a dual-stack socket
    ((), "127.0.0.1:8000", ("::ffff:127.0.0.1", 8000), True),
    ((), "localhost:8000", None, True),  # no server address (a unix socket): the bind host
    ((), "", ("127.0.0.1", 8000), False),
    (("*",), "anything", ("10.0.0.5", 8000), True),
])
def test_host_policy(allowed, host, server, expected):
    assert HostPolicy(allowed, "127.0.0.1").allows(host, server) is expected


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1"])
async def test_the_official_sdk_works_on_the_allowed_names(gateway, name):
    import openai

    base = gateway.base_url.replace("127.0.0.1", name) + "/v1"
    client = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    stream = await client.chat.completions.create(model="sim-fast", messages=messages,
                                                  stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text
    models = await client.models.list()  # a GET through the same checks
    assert models.object == "list"
    await client.close()
