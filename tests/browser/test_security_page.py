"""The page under issue 16's guards, in real Chromium: it still chats and resumes at
``http://localhost:PORT`` and ``http://127.0.0.1:PORT``; a page on another site cannot
start a generation or store anything; signed in through nginx auth_request it says who."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
from chatpage import ChatPage, Watch, replayed
from playwright.async_api import Browser

from support.fault_upstream import FaultUpstream, ok
from support.gateway import Gateway, running_gateway, serve_app

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1"])
async def test_the_page_chats_and_resumes_on_both_loopback_names(
    slow_live: Gateway, chat_factory: Callable[..., Any], http: aiohttp.ClientSession, name: str
) -> None:
    base = slow_live.base_url.replace("127.0.0.1", name)
    chat: ChatPage = await chat_factory(base)
    await chat.ask(f"Resume me at {name}", model="sim-chat")
    before = await chat.wait_text(40)
    assert before["state"] == "streaming"
    await chat.page.reload()  # re-attaches with Last-Event-ID
    await chat.ready()
    answer = await chat.wait_answer()
    assert answer["state"] == "complete"
    assert answer["stream_id"] == before["stream_id"]
    truth = await replayed(http, slow_live.base_url, answer["stream_id"])
    assert answer["content"] == truth.text
    chat.watch.assert_clean()


def _attacker_page(target: str) -> bytes:
    """What any web site can do without a CORS preflight: a text/plain form whose field
    name and value join into JSON, an urlencoded form, and a no-cors fetch."""
    body = {"model": "m", "messages": [{"role": "user", "content": "spend their key"}]}
    name = orjson.dumps(body)[:-1].decode() + ', "pad": "'
    fetch = orjson.dumps(body).decode()
    return f"""<!doctype html><html><body>
<form id="plain" method="POST" action="{target}/api/chat" enctype="text/plain" target="a">
  <input type="hidden" name='{name}' value='"}}'></form>
<form id="url" method="POST" action="{target}/v1/chat/completions" target="b">
  <input type="hidden" name="messages" value="x"></form>
<iframe name="a"></iframe><iframe name="b"></iframe>
<script>
  document.getElementById("plain").submit();
  document.getElementById("url").submit();
  fetch("{target}/api/chat", {{method: "POST", mode: "no-cors",
        headers: {{"Content-Type": "text/plain"}}, body: JSON.stringify({fetch})}})
    .then(() => {{ document.title = "fetched"; }}, () => {{ document.title = "failed"; }});
</script></body></html>""".encode()


async def test_a_page_on_another_site_cannot_start_a_generation(browser: Browser) -> None:
    async with FaultUpstream() as up:
        up.script(ok(["spent"]))
        async with running_gateway(TOKENRELAY_UPSTREAM_URL=up.base_url) as gw:
            page_html = _attacker_page(gw.base_url)

            async def attacker(scope: Any, receive: Any, send: Any) -> None:
                await send({"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"text/html")]})
                await send({"type": "http.response.body", "body": page_html})

            # localhost vs 127.0.0.1: another site, as far as the browser is concerned
            async with serve_app(attacker, lifespan="off") as evil_url:
                context = await browser.new_context()
                page = await context.new_page()
                statuses: dict[str, list[int]] = {}
                answered = asyncio.Event()  # both forms and the fetch got their answers

                def on_response(response: Any) -> None:
                    statuses.setdefault(response.url, []).append(response.status)
                    seen = [len(statuses.get(gw.base_url + p, ()))
                            for p in ("/api/chat", "/v1/chat/completions")]
                    if seen[0] >= 2 and seen[1] >= 1:
                        answered.set()

                page.on("response", on_response)
                await page.goto(evil_url.replace("127.0.0.1", "localhost") + "/")
                await asyncio.wait_for(answered.wait(), 30)
                await page.wait_for_function("document.title !== ''")
                await context.close()
            refused = {url.removeprefix(gw.base_url): codes for url, codes in statuses.items()
                       if url.startswith(gw.base_url)}
            assert refused == {"/api/chat": [403, 403], "/v1/chat/completions": [403]}, statuses
            assert up.requests == []  # no upstream call: the key was not spent
            assert not gw.hub.generations
            async with aiohttp.ClientSession() as http, http.get(
                    gw.base_url + "/api/conversations") as r:
                assert (await r.json())["conversations"] == []  # nothing stored


async def test_signed_in_through_nginx_the_page_says_who_and_chats(browser: Browser) -> None:
    from test_nginx_auth import SIGN_OUT, proxied

    async with proxied(lambda **env: running_gateway(**env)) as (url, _gw, _auth):
        context = await browser.new_context(
            http_credentials={"username": "alice", "password": "alice-pw"})
        page = await context.new_page()
        watch = Watch()
        watch.attach(page)
        await page.goto(url + "/")
        chat = ChatPage(page, watch, url)
        await chat.ready()
        signed_in = page.locator("#signed-in")
        await signed_in.wait_for()
        assert await page.locator("#user-name").inner_text() == "alice@example.com"
        assert await page.locator("#sign-out").get_attribute("href") == SIGN_OUT
        assert not await page.locator("#key-dialog").is_visible()  # no key asked for
        await chat.ask("Hello from behind nginx", model="sim-fast")
        assert (await chat.wait_answer())["state"] == "complete"
        await page.locator("#conv-list li").first.wait_for()
        assert await page.locator("#conv-list li").count() == 1
        watch.assert_clean()
        await context.close()
