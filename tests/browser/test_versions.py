"""Answer versions on the page (issue 19): Regenerate and edit-and-resend keep the earlier
versions, "‹ n / m ›" switches between them, and both survive a reload — with the history
on the server and with the history kept in the browser."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from chatpage import ChatPage

from support.gateway import Gateway, running_gateway

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]

LABEL = """([kind, text]) => {
    const a = [...document.querySelectorAll('article.msg-' + kind)].at(-1);
    const v = a && a.querySelector('.versions');
    return Boolean(v && !v.hidden && v.querySelector('.ver-label').textContent === text);
}"""


async def wait_label(chat: ChatPage, kind: str, text: str) -> None:
    """Wait until the last user message or answer shows ``text`` ("2 / 2") under it."""
    await chat.page.wait_for_function(LABEL, arg=[kind, text], timeout=20_000)


async def no_versions(chat: ChatPage, kind: str) -> bool:
    hidden: bool = await chat.page.evaluate(
        "(kind) => [...document.querySelectorAll('article.msg-' + kind + ' .versions')]"
        ".every((v) => v.hidden)", kind)
    return hidden


async def click_version(chat: ChatPage, kind: str, which: str) -> None:
    button = chat.page.locator(f"article.msg-{kind} .ver-{which}").last
    await button.click()


async def reload(chat: ChatPage) -> None:
    await chat.page.reload()
    await chat.ready()
    await chat.page.wait_for_selector("article.msg-assistant")


async def regenerate_then_edit(chat: ChatPage, *, server: bool) -> None:
    """The scenario on either history: two versions of an answer, two of a question."""
    page = chat.page
    await chat.ask("Original question", model="sim-fast")
    first = await chat.wait_answer()
    assert await no_versions(chat, "assistant") and await no_versions(chat, "user")

    await page.locator("article.msg-assistant .regen-btn").click()
    second = await chat.wait_answer()
    assert second["stream_id"] != first["stream_id"]
    await wait_label(chat, "assistant", "2 / 2")
    group = page.locator("article.msg-assistant .versions")
    assert await group.get_attribute("aria-label") == "Version 2 of 2"
    assert await page.locator("article.msg-assistant .ver-next").is_disabled()

    # Back to the first answer, from the keyboard.
    await page.locator("article.msg-assistant .ver-prev").focus()
    await page.keyboard.press("Enter")
    await wait_label(chat, "assistant", "1 / 2")
    assert (await chat.answer())["stream_id"] == first["stream_id"]
    assert await page.locator("article.msg-assistant .ver-prev").is_disabled()
    # Focus stays on the control (the pressed arrow is disabled at the end: its twin).
    assert await page.evaluate(
        "() => document.activeElement.classList.contains('ver-next')")
    await page.wait_for_function(
        "() => document.getElementById('announcer').textContent.includes('Version 1 of 2')")

    await reload(chat)  # the version shown is remembered
    await wait_label(chat, "assistant", "1 / 2")
    assert (await chat.answer())["stream_id"] == first["stream_id"]

    # Edit the question and send: a second version of the question, with its own answer.
    await page.locator("article.msg-user").hover()
    await page.locator("article.msg-user .edit-btn").click()
    await page.fill("#edit-input", "Edited question")
    await page.press("#edit-input", "Enter")
    edited = await chat.wait_answer()
    assert edited["state"] == "complete"
    await wait_label(chat, "user", "2 / 2")
    assert await page.locator("article.msg-user .bubble").all_inner_texts() == ["Edited question"]
    assert await no_versions(chat, "assistant")  # the new question has one answer so far

    await reload(chat)
    await wait_label(chat, "user", "2 / 2")
    await click_version(chat, "user", "prev")
    await wait_label(chat, "user", "1 / 2")
    assert await page.locator("article.msg-user .bubble").all_inner_texts() == [
        "Original question"]
    # With both of its answers: the server shows the newest one under the version picked,
    # the browser's history the one shown when the question was edited.
    if server:
        await wait_label(chat, "assistant", "2 / 2")
        assert (await chat.answer())["stream_id"] == second["stream_id"]
    else:
        await wait_label(chat, "assistant", "1 / 2")
        assert (await chat.answer())["stream_id"] == first["stream_id"]
        await click_version(chat, "assistant", "next")
        await wait_label(chat, "assistant", "2 / 2")
        assert (await chat.answer())["stream_id"] == second["stream_id"]

    await reload(chat)
    await wait_label(chat, "user", "1 / 2")
    await wait_label(chat, "assistant", "2 / 2")
    assert (await chat.answer())["stream_id"] == second["stream_id"]
    await chat.screenshot("versions")
    chat.watch.assert_clean()


async def test_versions_with_the_history_on_the_server(
    chat_factory: Callable[..., Any],
) -> None:
    async with running_gateway(TOKENRELAY_SIMULATOR_SPEED="3") as gw:  # an empty history
        await regenerate_then_edit(await chat_factory(gw.base_url), server=True)


async def test_versions_with_the_history_in_the_browser(
    chat_factory: Callable[..., Any],
) -> None:
    async with running_gateway(TOKENRELAY_SIMULATOR_SPEED="3",
                               TOKENRELAY_DATABASE_URL="none") as gw:
        chat: ChatPage = await chat_factory(gw.base_url)
        mode = await chat.page.locator("#history-mode").text_content()
        assert mode == "Saved in this browser"
        await regenerate_then_edit(chat, server=False)


async def test_a_stopped_answer_stays_a_version_with_its_badge(
    slow_live: Gateway, chat_factory: Callable[..., Any],
) -> None:
    chat: ChatPage = await chat_factory(slow_live.base_url)
    page = chat.page
    await chat.ask("Stop this answer", model="sim-chat")
    await chat.wait_text(3)
    await page.click("#stop")
    stopped = await chat.wait_answer()
    assert (stopped["state"], stopped["badge"]) == ("cancelled", "stopped")

    await page.locator("article.msg-assistant .regen-btn").click()
    await chat.wait_text(3)
    await page.click("#stop")  # no need to wait for a whole second answer
    await chat.wait_answer()
    await wait_label(chat, "assistant", "2 / 2")
    await click_version(chat, "assistant", "prev")
    await wait_label(chat, "assistant", "1 / 2")
    first = await chat.answer()
    assert (first["stream_id"], first["badge"]) == (stopped["stream_id"], "stopped")
    assert first["content"] == stopped["content"] and first["shown"].strip()

    await reload(chat)
    await wait_label(chat, "assistant", "1 / 2")
    again = await chat.answer()
    assert (again["stream_id"], again["state"], again["badge"]) == (
        stopped["stream_id"], "cancelled", "stopped")
    chat.watch.assert_clean()
