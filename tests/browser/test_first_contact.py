"""The page is never silently dead (issue 14): when the upstream's model list cannot be
fetched, a banner says why and what to do, the default model is still offered, a model name
can be typed, and Send works wherever the upstream can chat."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from chatpage import DOC_SCREENSHOTS, ChatPage, update_docs

from support.gateway import running_gateway
from support.servers import running_asgi
from support.upstreams import chat_only_upstream, closed_port, plain_web_server, self_signed_files
from tokenrelay.simulator import SimulatorConfig, build_text, create_simulator

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]


@contextlib.asynccontextmanager
async def gateway_for(upstream: str, **env: str) -> AsyncIterator[str]:
    async with running_gateway(TOKENRELAY_UPSTREAM_URL=upstream, **env) as gw:
        yield gw.base_url


async def banner(chat: ChatPage) -> dict[str, Any]:
    await chat.page.wait_for_selector("#upstream-banner", state="visible")
    result: dict[str, Any] = await chat.page.evaluate(
        """() => ({title: document.querySelector('#upstream-banner-title').innerText,
                   text: document.querySelector('#upstream-banner-text').innerText,
                   hint: document.querySelector('#upstream-banner-hint').innerText,
                   model: document.querySelector('#model').value,
                   options: [...document.querySelectorAll('#model option')].map(o => o.text),
                   nameShown: !document.querySelector('#model-name').hidden})""")
    return result


async def test_a_closed_port_shows_the_reason_and_keeps_the_default_model(
    chat_factory: Callable[..., Any],
) -> None:
    url = f"http://127.0.0.1:{closed_port()}/v1"
    async with gateway_for(url, TOKENRELAY_DEFAULT_MODEL="my-model") as base:
        chat: ChatPage = await chat_factory(base)
        shown = await banner(chat)
        assert shown["title"] == "The model list of “upstream” could not be fetched"
        assert f"GET {url}/models: connection refused by 127.0.0.1" in shown["text"]
        assert "start the model server" in shown["hint"]
        assert "You can still send with the default model" in shown["hint"]
        assert shown["model"] == "my-model"
        assert shown["options"] == ["my-model", "Other model…"]
        await chat.page.fill("#input", "hello")
        assert await chat.page.is_enabled("#send")
        chat.watch.assert_clean()


async def test_a_plain_web_server_lets_the_user_type_a_model_name(
    chat_factory: Callable[..., Any], tmp_path: Path,
) -> None:
    async with plain_web_server(tmp_path) as web, gateway_for(web) as base:
        chat: ChatPage = await chat_factory(base)
        shown = await banner(chat)
        assert f'GET {web}/models: HTTP 404, an HTML page ("Error response")' in shown["text"]
        assert "/v1" in shown["hint"]
        assert shown["options"] == ["Other model…"] and shown["nameShown"]
        await chat.page.fill("#input", "hello")
        assert not await chat.page.is_enabled("#send")  # no model yet
        await chat.page.fill("#model-name", "gpt-4o-mini")
        assert await chat.page.is_enabled("#send")
        await chat.page.reload()  # the typed name is remembered
        await chat.ready()
        assert await chat.page.input_value("#model-name") == "gpt-4o-mini"
        assert await chat.page.is_visible("#model-name")
        chat.watch.assert_clean()


async def test_an_untrusted_certificate_is_named_in_the_banner(
    chat_factory: Callable[..., Any], tmp_path: Path,
) -> None:
    cert, key = self_signed_files(tmp_path)
    app = create_simulator(SimulatorConfig(speed=20.0, first_token_delay_scale=0.0))
    async with running_asgi(app, ssl_certfile=str(cert), ssl_keyfile=str(key),
                            http="httptools") as plain:
        url = plain.replace("http://", "https://") + "/v1"
        async with gateway_for(url, TOKENRELAY_DEFAULT_MODEL="sim-chat") as base:
            chat: ChatPage = await chat_factory(base)
            shown = await banner(chat)
            assert "TLS certificate not trusted (self-signed certificate)" in shown["text"]
            assert "SSL_CERT_FILE" in shown["hint"]
            await chat.page.wait_for_timeout(50)  # let the fonts settle for the picture
            path = await chat.screenshot("banner")
            if update_docs():
                DOC_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
                (DOC_SCREENSHOTS / "banner.png").write_bytes(path.read_bytes())
            chat.watch.assert_clean()


async def test_send_works_with_the_default_and_a_typed_model_where_only_chat_works(
    chat_factory: Callable[..., Any],
) -> None:
    async with running_asgi(chat_only_upstream()) as upstream, \
            gateway_for(upstream + "/v1", TOKENRELAY_DEFAULT_MODEL="sim-fast") as base:
        chat: ChatPage = await chat_factory(base)
        shown = await banner(chat)
        assert '("404 Not Found")' in shown["text"]
        assert shown["model"] == "sim-fast"
        await chat.ask("first question")
        answer = await chat.wait_answer()
        assert answer["state"] == "complete"
        assert answer["model"] == "sim-fast"
        first = [{"role": "user", "content": "first question"}]
        assert answer["content"] == "".join(build_text("sim-fast", first))

        await chat.page.select_option("#model", label="Other model…")
        await chat.page.fill("#model-name", "sim-think")
        await chat.page.fill("#input", "second question")
        await chat.page.press("#input", "Enter")
        answer = await chat.wait_answer()
        assert answer["state"] == "complete"
        assert answer["model"] == "sim-think"
        assert answer["content"]
        chat.watch.assert_clean()
