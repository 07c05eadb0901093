"""The chat page's everyday tools (issue 19): visible waiting, jump to latest, a picker that
fits 320 px, the theme toggle, history search, export, and where focus lands."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from chatpage import ChatPage, open_chat, replayed
from playwright.async_api import Browser

from support.client import chat_body, read_stream
from support.fault_upstream import FaultUpstream, stall_first, status
from support.gateway import Gateway, running_gateway

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]

WAITING = "() => { const w = [...document.querySelectorAll('article.msg-assistant')].at(-1)" \
    "?.querySelector('.waiting'); return w && !w.hidden ? w.textContent : ''; }"

LIST_LENGTH = "(n) => document.querySelectorAll('#conv-list li').length === n"


async def _waiting_seconds(chat: ChatPage, at_least: int) -> str:
    """Wait until the last answer says it has waited ``at_least`` seconds; return the text."""
    await chat.page.wait_for_function(
        f"""(n) => {{
            const text = ({WAITING})();
            const m = /^waiting for the model · (\\d+) s$/.exec(text);
            return m && Number(m[1]) >= n;
        }}""",
        arg=at_least,
        timeout=20_000,
    )
    text: str = await chat.page.evaluate(WAITING)
    return text


async def test_a_stall_mid_answer_shows_the_wait_until_the_idle_budget_ends_it(
    chat_factory: Callable[..., Any],
) -> None:
    async with running_gateway(
        TOKENRELAY_SIMULATOR_SPEED="3", TOKENRELAY_HEARTBEAT_S="0.5",
        TOKENRELAY_IDLE_TIMEOUT_S="4",
    ) as gw:
        chat: ChatPage = await chat_factory(gw.base_url)
        await chat.ask("Tell me something", model="sim-stall")
        await chat.wait_text(1)
        assert await chat.page.evaluate(WAITING) == "", "no wait is shown while text flows"
        first = await _waiting_seconds(chat, 1)
        later = await _waiting_seconds(chat, 2)  # the local clock counts on
        assert first != later
        await chat.screenshot("waiting-stall")
        answer = await chat.wait_answer()
        assert answer["state"] == "error"  # the idle budget's end, shown as before
        assert await chat.page.evaluate(WAITING) == ""
        error = chat.page.locator("article.msg-assistant .msg-error")
        assert await error.is_visible()
        chat.watch.assert_clean()


async def test_a_silent_model_before_its_first_token_shows_the_wait_until_text_comes(
    chat_factory: Callable[..., Any],
) -> None:
    # A model that thinks without showing it (hidden reasoning): 2.5 s of heartbeats only.
    models = {"object": "list", "data": [{"id": "fault-model", "object": "model"}]}
    async with FaultUpstream() as upstream:
        upstream.script(status(200, body=models), stall_first(2.5, tokens=("Here it is.",)),
                        status(200, body=models))
        async with running_gateway(
            TOKENRELAY_UPSTREAM_URL=upstream.base_url, TOKENRELAY_DEFAULT_MODEL="fault-model",
            TOKENRELAY_HEARTBEAT_S="0.5",
        ) as gw:
            chat: ChatPage = await chat_factory(gw.base_url)
            await chat.ask("Think first", model="fault-model")
            assert (await _waiting_seconds(chat, 1)).startswith("waiting for the model")
            dots = chat.page.locator("article.msg-assistant .typing").last
            assert await dots.is_visible()
            await chat.screenshot("waiting-first-token")
            answer = await chat.wait_answer()
            assert answer["state"] == "complete" and answer["content"] == "Here it is."
            assert await chat.page.evaluate(WAITING) == ""
            assert await dots.is_hidden()
            chat.watch.assert_clean()


async def test_jump_to_latest_appears_when_scrolled_away_and_brings_the_answer_back(
    slow_live: Gateway, chat_factory: Callable[..., Any]
) -> None:
    chat: ChatPage = await chat_factory(slow_live.base_url,
                                        viewport={"width": 1000, "height": 480})
    page = chat.page
    jump = page.locator("#jump")
    await chat.ask("Write a long answer", model="sim-chat")
    await page.wait_for_function(
        "() => { const m = document.getElementById('messages');"
        " return m.scrollHeight > m.clientHeight + 300; }",
        timeout=30_000,
    )
    assert await jump.is_hidden(), "following the answer: no button"
    await page.evaluate("() => { document.getElementById('messages').scrollTop = 0; }")
    await jump.wait_for(state="visible")
    await page.wait_for_function(  # the answer grows below without pulling the reader down
        "() => document.getElementById('messages').scrollTop === 0"
        " && [...document.querySelectorAll('article.msg-assistant')].at(-1)"
        ".tokenrelay.content.length > 600",
        timeout=30_000,
    )
    await jump.focus()
    await page.keyboard.press("Enter")  # keyboard-only use
    await jump.wait_for(state="hidden")
    assert await page.evaluate(
        "() => { const m = document.getElementById('messages');"
        " return m.scrollHeight - m.scrollTop - m.clientHeight < 120; }"
    )
    assert await page.evaluate("() => document.activeElement.id") == "input"
    await page.click("#stop")
    await chat.wait_answer()
    chat.watch.assert_clean()


async def test_the_model_picker_fits_a_320_px_screen(
    live: Gateway, chat_factory: Callable[..., Any]
) -> None:
    chat: ChatPage = await chat_factory(live.base_url, viewport={"width": 320, "height": 640})
    page = chat.page
    for model in ("sim-chat", "sim-reasoner"):
        await page.select_option("#model", model)
        fit = await page.evaluate("""() => {
            const select = document.getElementById('model');
            const box = select.getBoundingClientRect();
            const style = getComputedStyle(select);
            const ctx = document.createElement('canvas').getContext('2d');
            ctx.font = `${style.fontSize} ${style.fontFamily}`;
            const text = select.selectedOptions[0].text;
            const room = box.width - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
            return {right: box.right, width: innerWidth, text, need: ctx.measureText(text).width,
                    room, scroll: document.documentElement.scrollWidth};
        }""")
        assert fit["text"] == model
        assert fit["right"] <= fit["width"] and fit["scroll"] <= fit["width"], fit
        assert fit["need"] <= fit["room"], f"the model name is clipped: {fit}"
    # Simulated models are still labelled, by their group in the list.
    groups = await page.eval_on_selector_all("#model optgroup", "gs => gs.map(g => g.label)")
    assert any("Simulated" in g for g in groups)
    await chat.screenshot("picker-320")
    chat.watch.assert_clean()


async def test_theme_toggle_is_remembered_across_reloads(
    live: Gateway, chat_factory: Callable[..., Any]
) -> None:
    chat: ChatPage = await chat_factory(live.base_url, color_scheme="light")
    page = chat.page
    background = "() => getComputedStyle(document.body).backgroundColor"
    light = await page.evaluate(background)
    await page.select_option("#theme", "dark")
    dark = await page.evaluate(background)
    assert dark != light
    await page.reload()
    await chat.ready()
    assert await page.input_value("#theme") == "dark"
    assert await page.evaluate(background) == dark
    assert await page.evaluate("() => document.documentElement.dataset.theme") == "dark"
    await page.select_option("#theme", "system")  # back to the OS (light here)
    assert await page.evaluate(background) == light
    await page.reload()
    await chat.ready()
    assert await page.input_value("#theme") == "system"
    chat.watch.assert_clean()


async def test_history_search_filters_by_title_and_text_on_the_server(
    chat_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    async with running_gateway(TOKENRELAY_SIMULATOR_SPEED="3") as gw:  # an empty history
        for question in ("Plan a trip to Lisbon", "Explain backpressure", "Weekly groceries"):
            async with http.post(gw.base_url + "/api/chat",
                                 json=chat_body(question, "sim-fast")) as resp:
                assert (await read_stream(resp)).terminal[0].event == "done"
        chat: ChatPage = await chat_factory(gw.base_url)
        page = chat.page
        items = page.locator("#conv-list .conv-open")
        await page.wait_for_function(LIST_LENGTH, arg=3)
        await page.fill("#conv-search", "LISBON")
        await page.wait_for_function(LIST_LENGTH, arg=1)
        assert await items.all_inner_texts() == ["Plan a trip to Lisbon"]
        await page.fill("#conv-search", "backpressure")  # the text of the question
        await page.wait_for_function(
            "() => [...document.querySelectorAll('#conv-list .conv-open')]"
            ".map(b => b.textContent).join() === 'Explain backpressure'"
        )
        await page.fill("#conv-search", "no such words anywhere")
        await page.locator("#conv-empty", has_text="No conversations match.").wait_for()
        await page.press("#conv-search", "Escape")
        await page.wait_for_function(LIST_LENGTH, arg=3)
        searched = [r for r in chat.watch.requests if "/api/conversations?q=" in r]
        assert searched, "the search ran on the server"
        chat.watch.assert_clean()


async def test_export_as_markdown_and_json_from_the_keyboard(
    live: Gateway, chat_factory: Callable[..., Any]
) -> None:
    chat: ChatPage = await chat_factory(live.base_url, accept_downloads=True)
    page = chat.page
    assert await page.locator("#export").is_disabled(), "nothing to export yet"
    await chat.ask("Export me, please", model="sim-fast")
    answer = await chat.wait_answer()

    await page.focus("#export")
    async with page.expect_download() as info:
        await page.keyboard.press("Enter")  # opens the menu on its first item
        await page.keyboard.press("Enter")
    markdown = await info.value
    assert markdown.suggested_filename == "export-me-please.md"
    text = open(await markdown.path(), encoding="utf-8").read()  # noqa: ASYNC230
    assert text.startswith("# Export me, please\n")
    assert "## You\n\nExport me, please" in text
    assert "## Assistant (sim-fast)" in text and answer["content"] in text
    assert await page.evaluate("() => document.activeElement.id") == "export"

    async with page.expect_download() as info:
        await page.keyboard.press("Enter")
        await page.keyboard.press("ArrowDown")
        await page.keyboard.press("Enter")
    exported = json.loads(open(await (await info.value).path(), encoding="utf-8").read())  # noqa: ASYNC230
    assert exported["title"] == "Export me, please"
    assert [m["role"] for m in exported["messages"]] == ["user", "assistant"]
    assert exported["messages"][1]["content"] == answer["content"]
    assert exported["messages"][1]["state"] == "complete"

    await page.keyboard.press("Enter")  # Escape closes the menu and gives focus back
    await page.locator("#export-menu").wait_for(state="visible")
    await page.keyboard.press("Escape")
    await page.locator("#export-menu").wait_for(state="hidden")
    assert await page.evaluate("() => document.activeElement.id") == "export"
    chat.watch.assert_clean()


async def test_focus_lands_somewhere_sensible_after_delete_and_regenerate(
    chat_factory: Callable[..., Any],
) -> None:
    async with running_gateway(TOKENRELAY_SIMULATOR_SPEED="3") as gw:  # an empty history
        chat: ChatPage = await chat_factory(gw.base_url)
        page = chat.page
        for question in ("First", "Second"):
            await page.click("#new-chat")
            await chat.ask(question, model="sim-fast")
            await chat.wait_answer()
        await page.wait_for_function(LIST_LENGTH, arg=2)

        # Regenerate from the keyboard: the pressed button leaves with its answer.
        await page.focus("article.msg-assistant .regen-btn")
        await page.keyboard.press("Enter")
        await chat.wait_answer()
        focused = await page.evaluate("() => document.activeElement.id")
        assert focused in ("stop", "input"), focused
        await page.wait_for_function("() => document.activeElement.id === 'input'")

        # Delete the first item of the list with the keyboard: focus moves to the next one.
        first = page.locator("#conv-list li").first
        await first.locator(".conv-open").focus()
        await page.keyboard.press("Tab")  # rename
        await page.keyboard.press("Tab")  # delete
        await page.keyboard.press("Enter")  # asks
        await page.keyboard.press("Enter")  # confirms
        await page.wait_for_function(LIST_LENGTH, arg=1)
        await page.wait_for_function(
            "() => document.activeElement.classList.contains('conv-open')"
            " && document.activeElement.textContent === 'First'"
        )
        # And deleting the last one leaves focus on New chat.
        await page.keyboard.press("Tab")
        await page.keyboard.press("Tab")
        await page.keyboard.press("Enter")
        await page.keyboard.press("Enter")
        await page.wait_for_function("() => document.activeElement.id === 'new-chat'")
        chat.watch.assert_clean()


async def test_ten_tabs_streaming_at_once_all_get_text_before_any_answer_ends(
    browser: Browser, http: aiohttp.ClientSession
) -> None:
    # HTTP/1.1 allows six connections per host: if each tab held its own, tabs seven to ten
    # could not even send their question until one of the first six answers ended. So the
    # check is an order, not a duration: every tab shows text before any answer has ended.
    async with running_gateway(TOKENRELAY_SIMULATOR_SPEED="1",
                               TOKENRELAY_HEARTBEAT_S="1") as gw:
        first_text: dict[str, float] = {}  # stream id -> when its first text reached the journal
        ends: list[float] = []  # when an answer's last frame reached the journal
        journal = gw.app.state.journal
        append_now = journal.append_now

        def record(stream_id: str, frames: list[bytes]) -> None:
            now = time.time() * 1000
            if stream_id not in first_text and any(b'data: {"content"' in f for f in frames):
                first_text[stream_id] = now
            if any(b"event: done" in f or b"event: error" in f for f in frames):
                ends.append(now)
            append_now(stream_id, frames)

        journal.append_now = record
        context = await browser.new_context(viewport={"width": 900, "height": 600})
        try:
            tabs = await asyncio.gather(*(open_chat(context, gw.base_url) for _ in range(10)))
            await asyncio.gather(*(t.ask(f"Tab {i} streams at once", model="sim-chat")
                                   for i, t in enumerate(tabs)))
            seen = await asyncio.gather(*(t.page.wait_for_function(
                """() => {
                    const a = [...document.querySelectorAll('article.msg-assistant')].at(-1);
                    return a && a.tokenrelay.first_token_at !== null
                        && [a.tokenrelay.stream_id, a.tokenrelay.first_token_at];
                }""", timeout=30_000) for t in tabs))
            shown = {}  # stream id -> when the page showed its first text (same clock)
            for handle in seen:
                stream_id, at_page = await handle.json_value()
                shown[stream_id[:8]] = at_page
            assert len(shown) == 10
            if ends:  # an answer (~3.6 s long) ended while some tab still waited for text
                first_end = min(ends)
                assert all(at < first_end for at in shown.values()), (
                    f"ms before the first answer ended: "
                    f"{ {k: round(first_end - at) for k, at in shown.items()} }")
            # Closing tabs mid-answer (the worker reconnects for the rest) loses nothing.
            for tab in tabs[:3]:
                tab.watch.assert_clean()
                await tab.page.close()
            tabs = tabs[3:]
            answers = await asyncio.gather(*(t.wait_answer() for t in tabs))
            assert {a["state"] for a in answers} == {"complete"}
            for tab, answer in zip(tabs, answers, strict=True):  # nothing lost or repeated
                truth = await replayed(http, gw.base_url, answer["stream_id"])
                assert answer["content"] == truth.text
                tab.watch.assert_clean()
        finally:
            await context.close()
