"""deploy/nginx-auth-request.conf for real: nginx with auth_request in front of tokenrelay,
a small auth service mapping basic credentials or a session cookie to two users, and two
separate histories (issue 16, points 3 and 5)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from support.client import chat_body, read_stream
from support.gateway import Gateway, serve_app
from support.nginx import NGINX, running_nginx


def test_nginx_is_installed():
    # Not a skip: `make test` installs nginx (scripts/system-deps.sh); without it the
    # auth_request tests below must fail, not vanish.
    assert Path(NGINX).exists(), "nginx missing: run `bash scripts/system-deps.sh`"

ALICE = {"Authorization": "Basic " + base64.b64encode(b"alice:alice-pw").decode()}
BOB = {"Cookie": "theme=dark; session=bob-session"}
SIGN_OUT = "/sign-out"


class AuthService:
    """The auth service nginx asks (``auth_request``): 200 naming the user in
    ``X-Auth-Request-User``, or 401 with a basic-auth challenge. It records every check."""

    def __init__(self) -> None:
        self.users = {("alice", "alice-pw"): "alice@example.com"}
        self.sessions = {"bob-session": "bob@example.com"}
        self.checks: list[str | None] = []

    def user(self, headers: dict[bytes, bytes]) -> str | None:
        auth = headers.get(b"authorization", b"")
        if auth.startswith(b"Basic "):
            name, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            return self.users.get((name, password))
        for part in headers.get(b"cookie", b"").decode().split(";"):
            key, _, value = part.strip().partition("=")
            if key == "session":
                return self.sessions.get(value)
        return None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        user = self.user(dict(scope["headers"]))
        self.checks.append(user)
        headers = [(b"content-length", b"0")]
        if user:
            headers.append((b"x-auth-request-user", user.encode()))
        else:
            headers.append((b"www-authenticate", b'Basic realm="tokenrelay"'))
        await send({"type": "http.response.start", "status": 200 if user else 401,
                    "headers": headers})
        await send({"type": "http.response.body", "body": b""})


def _rewrite(gateway_port: int, auth_port: int):
    def rewrite(conf: str, port: int) -> str:
        for old, new in (("listen 80;", f"listen 127.0.0.1:{port};"),
                         ("server 127.0.0.1:8000;", f"server 127.0.0.1:{gateway_port};"),
                         ("server 127.0.0.1:9091;", f"server 127.0.0.1:{auth_port};"),
                         ("client_header_timeout 10s;", "client_header_timeout 1s;")):
            assert conf.count(old) == 1, old
            conf = conf.replace(old, new)
        return conf
    return rewrite


@contextlib.asynccontextmanager
async def proxied(gateway_factory: Any, **env: str
                  ) -> AsyncIterator[tuple[str, Gateway, AuthService]]:
    """nginx (deploy/nginx-auth-request.conf) → tokenrelay trusting it; (url, gw, auth)."""
    auth = AuthService()
    # (plain uvicorn: no header cap of its own, so the gateway's is the one tested)
    async with serve_app(auth, lifespan="off", http="httptools") as auth_url, gateway_factory(
        TOKENRELAY_TRUSTED_USER_HEADER="X-Forwarded-User",
        TOKENRELAY_TRUSTED_PROXIES="127.0.0.1", TOKENRELAY_SIGN_OUT_URL=SIGN_OUT, **env,
    ) as gw:
        rewrite = _rewrite(int(gw.base_url.rsplit(":", 1)[1]), int(auth_url.rsplit(":", 1)[1]))
        async with running_nginx("nginx-auth-request.conf", rewrite) as url:
            yield url, gw, auth


async def _ask(http: aiohttp.ClientSession, url: str, who: dict[str, str], text: str
               ) -> tuple[str, str]:
    async with http.post(url + "/api/chat", json=chat_body(text, sim={"tokens": 5}),
                         headers=who) as r:
        assert r.status == 200, await r.text()
        stream = await read_stream(r)
        assert stream.events[-1].data["state"] == "complete"
        return r.headers["X-Stream-Id"], r.headers["X-Conversation-Id"]


async def _titles(http: aiohttp.ClientSession, url: str, who: dict[str, str]) -> list[str]:
    async with http.get(url + "/api/conversations", headers=who) as r:
        assert r.status == 200
        return [c["title"] for c in (await r.json())["conversations"]]


async def test_two_users_signed_in_by_auth_request_have_two_separate_histories(
    gateway_factory, http
):
    async with proxied(gateway_factory) as (url, gw, auth):
        # Nobody signed in: nginx refuses, tokenrelay never hears of it.
        for method, path in (("POST", "/api/chat"), ("GET", "/api/conversations"),
                             ("GET", "/")):
            async with http.request(method, url + path, json=chat_body("x")) as r:
                assert r.status == 401
                assert (await r.json())["error"]["code"] == "unauthorized"
        assert not gw.hub.generations
        alice_stream, alice_conv = await _ask(http, url, ALICE, "alice's question")
        _, bob_conv = await _ask(http, url, BOB, "bob's question")
        await _ask(http, url, BOB, "bob's second question")
        assert await _titles(http, url, ALICE) == ["alice's question"]
        assert await _titles(http, url, BOB) == ["bob's second question", "bob's question"]
        # A name a client sends itself is replaced by nginx: still alice.
        spoof = {**ALICE, "X-Forwarded-User": "bob@example.com"}
        assert await _titles(http, url, spoof) == ["alice's question"]
        # Each one's ids are unknown to the other.
        for path in (f"/api/conversations/{alice_conv}", f"/api/streams/{alice_stream}",
                     f"/api/streams/{alice_stream}/events"):
            async with http.get(url + path, headers=BOB) as r:
                assert r.status == 404, path
        async with http.get(f"{url}/api/conversations/{bob_conv}", headers=ALICE) as r:
            assert r.status == 404
        # Resume through nginx works for the owner.
        async with http.get(f"{url}/api/streams/{alice_stream}/events",
                            headers={**ALICE, "Last-Event-ID": "0"}) as r:
            assert (await read_stream(r)).events[-1].data["state"] == "complete"
        async with http.get(url + "/api/config", headers=BOB) as r:
            config = await r.json()
        assert config["user"] == "bob@example.com" and config["sign_out_url"] == SIGN_OUT
        assert config["auth_required"] is False
        assert set(auth.checks) == {None, "alice@example.com", "bob@example.com"}


async def test_refusals_through_nginx_arrive_as_json(gateway_factory, http):
    async with proxied(gateway_factory) as (url, gw, _):
        big = orjson.dumps(chat_body("x" * 2_000_000))
        async with http.post(url + "/api/chat", data=big,
                             headers={**ALICE, "Content-Type": "application/json"}) as r:
            assert r.status == 413  # nginx's client_max_body_size, answered as JSON
            assert (await r.json())["error"]["code"] == "body_too_large"
        many = {f"X-H{i}": "v" for i in range(200)}
        async with http.get(url + "/api/models", headers={**ALICE, **many}) as r:
            assert r.status == 431  # nginx passes them on; tokenrelay's max_headers
            assert (await r.json())["error"]["code"] == "too_many_headers"
        async with http.post(url + "/api/chat", data=orjson.dumps(chat_body("x")), headers={
                **ALICE, "Content-Type": "text/plain", "Origin": "https://evil.example"}) as r:
            assert r.status == 403
            assert (await r.json())["error"]["code"] == "origin_not_allowed"
        assert not gw.hub.generations
        # A head that never ends is cut by nginx's client_header_timeout (1 s here).
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /api/models HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        await writer.drain()
        loop = asyncio.get_running_loop()
        started = loop.time()
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(reader.read(), 1 + 2)
        assert loop.time() - started < 1 + 2
        writer.close()
