"""The chat page through failover (issue 15): a cut answer continued by the gateway reads
as one answer; a model whose every route is paused shows the error and when to retry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from chatpage import ChatPage

from support.failover import config_gateway, model, provider
from support.fault_upstream import FaultUpstream, continues, reset_after, status

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]
TOKENS = ["A ", "cut ", "answer ", "**goes** ", "on ", "and ", "ends ", "well."]


async def test_a_continued_answer_is_shown_whole_and_complete(
    chat_factory: Callable[..., Any],
) -> None:
    async with FaultUpstream("m-up") as up:
        up.script(reset_after(TOKENS, 3), continues(TOKENS))
        tables = [provider("p", up, supports_prefill=True),
                  model("m", "p", "m-up", continue_after_cut=True)]
        async with config_gateway(*tables) as gw:
            chat: ChatPage = await chat_factory(gw.base_url)
            await chat.ask("go", model="m")
            answer = await chat.wait_answer()
            assert answer["state"] == "complete"
            assert answer["content"] == "".join(TOKENS)
            assert "goes on and ends well." in answer["shown"]  # rendered as Markdown
            assert len(up.requests) == 2
            chat.watch.assert_clean()


async def test_a_model_whose_routes_are_all_paused_shows_the_error(
    chat_factory: Callable[..., Any],
) -> None:
    async with FaultUpstream("m-up") as up:
        up.script(status(500))
        tables = [provider("p", up, attempts=1, breaker={"failures": 1, "cooldown_s": 60}),
                  model("m", "p", "m-up")]
        async with config_gateway(*tables) as gw:
            chat: ChatPage = await chat_factory(gw.base_url)
            await chat.ask("first", model="m")
            assert (await chat.wait_answer())["state"] == "error"
            await chat.ask("second", model="m")
            answer = await chat.wait_answer()
            assert answer["state"] == "error"
            assert len(up.requests) == 1  # the second never reached the provider
            error = await chat.page.locator("article.msg-assistant").last.inner_text()
            assert "paused after repeated failures" in error
            chat.watch.assert_clean()
