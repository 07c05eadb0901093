"""The chat page end to end: streaming, Stop, reload and network-drop resume, retries,
safety against hostile output, keyboard use and many tabs (issue 4)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from chatpage import (
    DOC_SCREENSHOTS,
    ChatPage,
    Watch,
    open_chat,
    replayed,
    stream_info,
    update_docs,
)
from playwright.async_api import Browser

from support.client import chat_body, read_stream
from support.fault_upstream import FaultUpstream, ok, status
from support.gateway import Gateway, running_gateway
from tokenrelay.simulator import build_text

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]
SPEED = "3"


async def test_answer_grows_token_by_token_and_matches_the_stream(
    live: Gateway, chat_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    chat: ChatPage = await chat_factory(live.base_url)
    await chat.ask("Explain server-sent events", model="sim-chat")
    seen: list[int] = []
    state = ""
    while state != "complete" and len(seen) < 200:
        # Wait for the *rendered* answer to change (grow or finish), then record its length.
        await chat.page.wait_for_function(
            """(n) => {
                const a = [...document.querySelectorAll('article.msg-assistant')].at(-1);
                return a && (a.querySelector('.md').innerText.length !== n
                             || a.dataset.state === 'complete');
            }""",
            arg=seen[-1] if seen else -1,
        )
        answer = await chat.answer()
        state = answer["state"]
        seen.append(len(answer["shown"]))
        if len(seen) == 2:
            await chat.screenshot("streaming")
    final = seen[-1]
    intermediate = sorted({n for n in seen if 0 < n < final})
    assert len(intermediate) >= 3, f"the answer should visibly grow, saw lengths {seen}"

    answer = await chat.answer()
    truth = await replayed(http, live.base_url, answer["stream_id"])
    assert answer["content"] == truth.text
    assert answer["model"] == "sim-chat"
    # Rendered as markdown: a heading, a list and a highlighted code block with a copy button.
    last = chat.page.locator("article.msg-assistant").last
    assert await last.locator(".md h2").count() >= 1
    assert await last.locator(".md li").count() >= 3
    assert await last.locator(".md .code-block code.hljs, .md .code-block code").count() >= 1
    assert await last.locator(".md .copy-code").count() >= 1
    stats = await last.locator(".stats").inner_text()
    assert "TTFT" in stats and "tok/s" in stats and "Tokens" in stats
    await chat.screenshot("complete")
    chat.watch.assert_clean()


async def test_stop_button_cancels_the_upstream_and_keeps_the_partial_text(
    slow_live: Gateway, chat_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    chat: ChatPage = await chat_factory(slow_live.base_url)
    await chat.ask("Tell me about backpressure", model="sim-chat")
    await chat.wait_text(40)
    await chat.page.click("#stop")
    answer = await chat.wait_answer()
    assert answer["state"] == "cancelled"
    assert answer["badge"] == "stopped"
    assert len(answer["content"]) >= 40, "the partial answer stays visible"
    info = await stream_info(http, slow_live.base_url, answer["stream_id"])
    assert info["finished"] is True
    assert info["state"] == "cancelled"
    truth = await replayed(http, slow_live.base_url, answer["stream_id"])
    assert truth.terminal[0].data["state"] == "cancelled"
    assert answer["content"] == truth.text
    assert await chat.page.is_visible("#send"), "the composer is ready again"
    await chat.screenshot("stopped")
    chat.watch.assert_clean()


async def test_reload_mid_answer_reattaches_and_completes_with_the_exact_text(
    slow_live: Gateway, chat_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    chat: ChatPage = await chat_factory(slow_live.base_url)
    await chat.ask("What happens on reload?", model="sim-chat")
    before = await chat.wait_text(60)
    assert before["state"] == "streaming"
    await chat.page.reload()
    await chat.ready()
    answer = await chat.wait_answer()
    assert answer["state"] == "complete"
    assert answer["stream_id"] == before["stream_id"], "the same answer, not a new one"
    assert answer["content"].startswith(before["content"])
    truth = await replayed(http, slow_live.base_url, answer["stream_id"])
    assert answer["content"] == truth.text
    # The user's message came back too, and only one answer is shown.
    assert await chat.page.locator("article.msg-user").count() == 1
    assert await chat.page.locator("article.msg-assistant").count() == 1
    await chat.screenshot("after-reload")
    chat.watch.assert_clean()


async def test_network_drop_mid_answer_resumes_without_duplicates(
    slow_live: Gateway, chat_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    chat: ChatPage = await chat_factory(slow_live.base_url)
    await chat.ask("Keep going through a network drop", model="sim-chat")
    await chat.wait_text(40)
    context = chat.page.context
    await context.set_offline(True)
    conn = chat.page.locator("article.msg-assistant .conn")
    await conn.filter(has_text="reconnecting…").wait_for()
    await chat.screenshot("reconnecting")
    # While the tab is offline the generation goes on: wait (as another client) until the
    # stream is five events past what the page holds, so resuming has text to catch up on.
    answer = await chat.answer()
    url = f"{slow_live.base_url}/api/streams/{answer['stream_id']}/events"
    async with http.get(url, headers={"Last-Event-ID": str(answer["last_seq"])}) as resp:
        ahead = await read_stream(resp, stop_after=5)
    assert len(ahead.events) == 5
    await context.set_offline(False)
    answer = await chat.wait_answer()
    assert answer["state"] == "complete"
    assert await conn.inner_text() == "resumed"
    truth = await replayed(http, slow_live.base_url, answer["stream_id"])
    assert answer["content"] == truth.text, "no duplicated or missing text"
    await chat.screenshot("resumed")
    chat.watch.assert_clean(allow_errors=["net::ERR_INTERNET_DISCONNECTED"])


async def test_retry_countdown_shows_while_the_upstream_is_rate_limited(
    live: Gateway, chat_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    chat: ChatPage = await chat_factory(live.base_url)
    await chat.ask("Please answer despite rate limits", model="sim-flaky")
    notice = chat.page.locator("article.msg-assistant .notice")
    await notice.filter(has_text="Rate limited — retrying in").wait_for()
    text = await notice.inner_text()
    assert "retrying in 1 s" in text
    await chat.screenshot("retry-countdown")
    answer = await chat.wait_answer()
    assert answer["state"] == "complete"
    assert not await notice.is_visible()
    truth = await replayed(http, live.base_url, answer["stream_id"])
    assert [e.event for e in truth.events].count("retry") >= 1
    assert answer["content"] == truth.text
    chat.watch.assert_clean()


HOSTILE_USER_MESSAGES = [
    "<img src=x onerror=alert(1)>",
    "<script>alert(1)</script>",
    "[x](javascript:alert(1))",
    "![](http://example.com/x.png)",
]

HOSTILE_ANSWER = [
    "Raw HTML: <img src=x onerror=alert(1)> and <script>alert(2)</script>\n\n",
    "<iframe src=\"javascript:alert(3)\"></iframe> <svg onload=alert(4)></svg>\n\n",
    "[js link](javascript:alert(5)) [data link](data:text/html,<script>alert(6)</script>) ",
    "[vb](vbscript:msgbox(7)) [safe](https://example.com/safe) <https://example.org/auto>\n\n",
    "![remote image](http://example.com/x.png) ![tracker](//example.net/p.gif)\n\n",
    "<a href=\"javascript:alert(8)\" onclick=\"alert(9)\">raw anchor</a>\n\n",
    "<style>body{display:none}</style><link rel=stylesheet href=http://example.com/s.css>\n\n",
    "| a | b |\n|:-:|--:|\n| <b onmouseover=alert(10)>x</b> | [t](javascript:alert(11)) |\n",
]


async def assert_no_active_content(chat: ChatPage) -> None:
    """Nothing in the conversation can run script or fetch: no such elements or attributes."""
    found = await chat.page.evaluate(
        """() => {
            const log = document.getElementById('log');
            const bad = [...log.querySelectorAll(
                'img, script, iframe, svg, math, style, link, object, embed, form, video, audio')]
                .map(e => e.tagName);
            for (const el of log.querySelectorAll('*')) {
                for (const attr of el.attributes) {
                    if (/^on/i.test(attr.name) || attr.name === 'style' || attr.name === 'src'
                        || attr.name === 'srcset') bad.push(el.tagName + '@' + attr.name);
                }
            }
            const links = [...log.querySelectorAll('a')].map(a => ({
                href: a.getAttribute('href'), rel: a.getAttribute('rel'),
                target: a.getAttribute('target')}));
            return {bad, links};
        }"""
    )
    assert found["bad"] == []
    for link in found["links"]:
        if link["href"] is None:
            continue
        assert link["href"].startswith(("http://", "https://", "mailto:")), link
        assert link["rel"] == "noopener noreferrer" and link["target"] == "_blank", link


async def test_hostile_user_messages_quoted_by_the_model_run_no_script(
    live: Gateway, chat_factory: Callable[..., Any]
) -> None:
    chat: ChatPage = await chat_factory(live.base_url)
    for i, payload in enumerate(HOSTILE_USER_MESSAGES):
        await chat.ask(payload, model="sim-fast")
        await chat.page.wait_for_function(
            "(n) => document.querySelectorAll('article.msg-assistant[data-state=complete]')"
            ".length === n",
            arg=i + 1,
        )
    bubbles = await chat.page.locator("article.msg-user .bubble").all_inner_texts()
    assert bubbles == HOSTILE_USER_MESSAGES, "user text is shown literally"
    shown = await chat.page.locator("article.msg-assistant .md").all_inner_texts()
    assert "<img src=x onerror=alert(1)>" in shown[0], "raw HTML in the answer is text"
    assert "<script>alert(1)</script>" in shown[1]
    await assert_no_active_content(chat)
    await chat.screenshot("hostile-user")
    chat.watch.assert_clean()


async def test_hostile_model_output_runs_no_script_and_loads_nothing_remote(
    chat_factory: Callable[..., Any],
) -> None:
    models = {"object": "list", "data": [{"id": "fault-model", "object": "model"}]}
    async with FaultUpstream() as upstream:
        # Each request takes the next step (the last repeats): the page's model list, the
        # answer, then the model list again for every later page load.
        upstream.script(status(200, body=models), ok(HOSTILE_ANSWER), status(200, body=models))
        async with running_gateway(
            TOKENRELAY_UPSTREAM_URL=upstream.base_url, TOKENRELAY_DEFAULT_MODEL="fault-model"
        ) as gw:
            chat: ChatPage = await chat_factory(gw.base_url)
            await chat.page.select_option("#model", "fault-model")
            await chat.ask("show me something nasty")
            answer = await chat.wait_answer()
            assert answer["state"] == "complete"
            assert answer["content"] == "".join(HOSTILE_ANSWER)
            text = answer["shown"]
            assert "<img src=x onerror=alert(1)>" in text
            assert "<script>alert(2)</script>" in text
            assert "remote image" in text, "an image is shown as its alt text, never fetched"
            await assert_no_active_content(chat)
            links = chat.page.locator("article.msg-assistant .md a[href]")
            hrefs = await links.evaluate_all("els => els.map(e => e.getAttribute('href'))")
            assert "https://example.com/safe" in hrefs
            assert not [h for h in hrefs if "javascript" in h or h.startswith("data:")]
            # The same answer loaded again from the history API is just as inert.
            await chat.page.reload()
            await chat.ready()
            await chat.page.locator("article.msg-assistant .md a").first.wait_for()
            await assert_no_active_content(chat)
            await chat.screenshot("hostile-model")
            chat.watch.assert_clean()


async def test_keyboard_only_flow(
    slow_live: Gateway, chat_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    chat: ChatPage = await chat_factory(slow_live.base_url)
    page = chat.page
    for _ in range(30):
        if await page.evaluate("document.activeElement && document.activeElement.id") == "input":
            break
        await page.keyboard.press("Tab")
    assert await page.evaluate("document.activeElement.id") == "input", "Tab reaches the input"
    await page.keyboard.type("first line")
    await page.keyboard.press("Shift+Enter")
    await page.keyboard.type("second line")
    assert await page.input_value("#input") == "first line\nsecond line"
    assert await page.locator("article.msg-user").count() == 0, "Shift+Enter does not send"
    await page.keyboard.press("Enter")
    await page.locator("article.msg-user").wait_for()
    assert await page.locator("article.msg-user .bubble").inner_text() == (
        "first line\nsecond line"
    )
    await chat.wait_text(20)
    await page.keyboard.press("Escape")
    answer = await chat.wait_answer()
    assert answer["state"] == "cancelled" and answer["badge"] == "stopped"
    info = await stream_info(http, slow_live.base_url, answer["stream_id"])
    assert info["state"] == "cancelled"
    # Focus never got lost: typing goes straight into the message box again.
    await page.keyboard.type("next")
    assert await page.input_value("#input") == "next"
    chat.watch.assert_clean()


async def test_eight_tabs_with_four_streaming_all_complete(
    live: Gateway, browser: Browser, http: aiohttp.ClientSession
) -> None:
    context = await browser.new_context(viewport={"width": 1000, "height": 700})
    tabs = await asyncio.gather(*(open_chat(context, live.base_url) for _ in range(8)))
    streaming = tabs[:4]
    await asyncio.gather(
        *(t.ask(f"Tab {i} asks about many tabs", model="sim-chat")
          for i, t in enumerate(streaming))
    )
    await asyncio.gather(*(t.wait_text(20) for t in streaming))
    # While four answers stream, the idle tabs still load and answer (no connection starved).
    idle = tabs[4:]
    for t in idle:
        await t.page.reload()
        await t.ready()
    answers = await asyncio.gather(*(t.wait_answer() for t in streaming))
    assert [a["state"] for a in answers] == ["complete"] * 4
    for a in answers:
        truth = await replayed(http, live.base_url, a["stream_id"])
        assert a["content"] == truth.text
    await idle[0].ask("And one more from an idle tab", model="sim-fast")
    assert (await idle[0].wait_answer())["state"] == "complete"
    for t in tabs:
        t.watch.assert_clean()
    await context.close()


async def test_history_sidebar_open_rename_delete(
    chat_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    async with running_gateway(TOKENRELAY_SIMULATOR_SPEED=SPEED) as gw:  # an empty history
        chat: ChatPage = await chat_factory(gw.base_url)
        page = chat.page
        await chat.ask("First conversation", model="sim-fast")
        await chat.wait_answer()
        await page.click("#new-chat")
        await chat.ask("Second conversation", model="sim-fast")
        await chat.wait_answer()
        items = page.locator("#conv-list .conv-open")
        await page.wait_for_function(
            "() => document.querySelectorAll('#conv-list li').length === 2"
        )
        assert await items.all_inner_texts() == ["Second conversation", "First conversation"]

        await items.nth(1).click()
        await page.locator("article.msg-user .bubble", has_text="First conversation").wait_for()
        assert await page.locator("#conv-title").inner_text() == "First conversation"

        await page.locator("#conv-list li").nth(1).hover()  # the item's buttons show on hover
        await page.locator("#conv-list li").nth(1).locator(".conv-rename").click()
        await page.fill(".conv-rename-input", "Renamed chat")
        await page.press(".conv-rename-input", "Enter")
        await page.locator("#conv-list .conv-open", has_text="Renamed chat").wait_for()
        assert await page.locator("#conv-title").inner_text() == "Renamed chat"
        async with http.get(gw.base_url + "/api/conversations") as resp:
            titles = [c["title"] for c in (await resp.json())["conversations"]]
        assert sorted(titles) == ["Renamed chat", "Second conversation"]

        second = page.locator("#conv-list li", has_text="Second conversation")
        await second.hover()
        delete = second.locator(".conv-delete")
        await delete.click()
        assert await delete.inner_text() == "Delete?", "a first click only asks"
        await delete.click()
        await page.wait_for_function(
            "() => document.querySelectorAll('#conv-list li').length === 1"
        )
        async with http.get(gw.base_url + "/api/conversations") as resp:
            titles = [c["title"] for c in (await resp.json())["conversations"]]
        assert titles == ["Renamed chat"]
        await chat.screenshot("history")
        chat.watch.assert_clean()


async def test_regenerate_and_edit_last_message(
    live: Gateway, chat_factory: Callable[..., Any], http: aiohttp.ClientSession
) -> None:
    chat: ChatPage = await chat_factory(live.base_url)
    page = chat.page
    await chat.ask("Original question", model="sim-fast")
    first = await chat.wait_answer()
    await page.locator("article.msg-assistant .regen-btn").click()
    second = await chat.wait_answer()
    assert second["stream_id"] != first["stream_id"]
    assert await page.locator("article.msg-assistant").count() == 1

    await page.locator("article.msg-user").hover()
    await page.locator("article.msg-user .edit-btn").click()
    await page.fill("#edit-input", "Edited question")
    await page.press("#edit-input", "Enter")
    third = await chat.wait_answer()
    assert third["state"] == "complete"
    assert await page.locator("article.msg-user .bubble").all_inner_texts() == ["Edited question"]
    assert 'Edited question' in third["content"], "the simulator quotes the edited text"
    chat.watch.assert_clean()


async def test_reasoning_and_tool_calls_are_shown(
    live: Gateway, chat_factory: Callable[..., Any]
) -> None:
    chat: ChatPage = await chat_factory(live.base_url)
    page = chat.page
    await chat.ask("Think first", model="sim-reasoner")
    await page.locator("article.msg-assistant .thinking-label", has_text="Thinking…").wait_for()
    answer = await chat.wait_answer()
    assert answer["reasoning"]
    label = await page.locator("article.msg-assistant .thinking-label").inner_text()
    assert label.startswith("Thought for ") and label.endswith(" s")
    await page.click("#new-chat")
    await chat.ask("Call tools", model="sim-tools")
    await chat.wait_answer()
    names = await page.locator("article.msg-assistant .tool-name").all_inner_texts()
    assert names == ["get_weather", "get_time"]
    chat.watch.assert_clean()


CRAFTED_MARKDOWN = (
    "# Title\n\nIntro with **bold** and `code`.\n\n"
    "1. one\n2. two\n\n   continued inside item two\n\n3. three\n\n"
    "```python\ndef f():\n\n    return 1\n```\n\n"
    "~~~\nplain fence\n\n~~~\n\n"
    "| a | b |\n|---|--:|\n| 1 | 2 |\n\n"
    "> quote\n\n- x\n- y\n\nThe end."
)


async def test_incremental_markdown_ends_as_the_full_render(
    live: Gateway, chat_factory: Callable[..., Any]
) -> None:
    """Rendering the tail as it grows (stable blocks kept) ends like one full render, and an
    unfinished code fence is shown as code while it streams."""
    sample = "".join(build_text("sim-chat", [{"role": "user", "content": "markdown"}],
                                length=600))
    chat: ChatPage = await chat_factory(live.base_url)
    result = await chat.page.evaluate(
        """async (texts) => {
            const { Renderer, MarkdownView } = await import('/static/markdown.js');
            const r = new Renderer();
            const shape = (root) => ['h1', 'h2', 'h3', 'p', 'li', 'pre', 'table', 'blockquote',
                                     'code.hljs', 'td.align-right']
                .map((s) => s + '=' + root.querySelectorAll(s).length).join(' ');
            const out = [];
            for (const text of texts) {
                const root = document.createElement('div');
                const view = new MarkdownView(r, root);
                let openFenceShownAsCode = true;
                for (let i = 1; i <= text.length; i += 2) {
                    view.render(text.slice(0, i), false);
                    const prefix = text.slice(0, i);
                    const fences = (prefix.match(/^(```|~~~)/gm) || []).length;
                    if (fences % 2 === 1 && prefix.endsWith('\\n')
                        && !root.querySelector('.md-tail pre')) openFenceShownAsCode = false;
                }
                view.render(text, true);
                const whole = document.createElement('div');
                whole.appendChild(r.fragment(text));
                out.push({
                    incremental: root.textContent.replace(/\\s+/g, ' ').trim(),
                    full: whole.textContent.replace(/\\s+/g, ' ').trim(),
                    incShape: shape(root), fullShape: shape(whole), openFenceShownAsCode,
                });
            }
            return out;
        }""",
        [sample, CRAFTED_MARKDOWN],
    )
    for case in result:
        assert case["incremental"] == case["full"]
        assert case["incShape"] == case["fullShape"]
        assert case["openFenceShownAsCode"]


async def test_api_key_prompt_when_the_gateway_requires_keys(browser: Browser) -> None:
    async with running_gateway(
        TOKENRELAY_SIMULATOR_SPEED=SPEED, TOKENRELAY_API_KEYS="tester:correct-key-123"
    ) as gw:
        context = await browser.new_context()
        page = await context.new_page()
        watch = Watch()
        watch.attach(page)
        await page.goto(gw.base_url + "/")
        await page.locator("#key-dialog[open]").wait_for()
        await page.fill("#key-input", "wrong-key-000")
        await page.press("#key-input", "Enter")
        # The refused key (401 on /api/models) brings the prompt back, saying so.
        await page.locator("#key-desc", has_text="refused").wait_for()
        await page.fill("#key-input", "correct-key-123")
        await page.press("#key-input", "Enter")
        chat = ChatPage(page, watch, gw.base_url)
        await chat.ready()
        assert not await page.locator("#key-dialog").is_visible()
        await chat.ask("Hello with a key", model="sim-fast")
        assert (await chat.wait_answer())["state"] == "complete"
        assert await page.evaluate("() => localStorage.getItem('tokenrelay.apiKey')") == (
            "correct-key-123"
        )
        watch.assert_clean(allow_errors=["status of 401"])
        await context.close()


async def test_without_a_history_api_conversations_stay_in_the_browser(
    chat_factory: Callable[..., Any],
) -> None:
    async with running_gateway(
        TOKENRELAY_SIMULATOR_SPEED=SPEED, TOKENRELAY_DATABASE_URL="none"
    ) as gw:
        chat: ChatPage = await chat_factory(gw.base_url)
        page = chat.page
        assert await page.inner_text("#history-mode") == "Saved in this browser"
        await chat.ask("Remember me locally", model="sim-fast")
        first = await chat.wait_answer()
        await page.reload()
        await chat.ready()
        await page.locator("#conv-list .conv-open", has_text="Remember me locally").wait_for()
        restored = await chat.answer()
        assert restored["content"] == first["content"] and restored["state"] == "complete"
        # The history probe may be refused by the server; nothing else may fail.
        chat.watch.assert_clean(allow_errors=["/api/conversations", "status of 404",
                                              "status of 500", "status of 503"])


async def test_sse_parser_accepts_any_chunking(
    live: Gateway, chat_factory: Callable[..., Any]
) -> None:
    """The page's JS parser, cut at every offset, with LF, CRLF and CR line ends."""
    chat: ChatPage = await chat_factory(live.base_url)
    result = await chat.page.evaluate(
        """async () => {
            const { SSEParser, readEvents } = await import('/static/sse.js');
            const base = 'id: 1\\nevent: start\\ndata: {"a":1}\\n\\n: heartbeat\\n\\n'
                + 'id: 2\\ndata: {"content":"caf\\u00e9 \\u2028 \\ud83d\\ude00"}\\n\\n'
                + 'data:no-space\\ndata: second line\\n\\nevent: ignored-without-data\\n\\n'
                + 'id: 3\\nevent: done\\ndata: {}\\n\\n';
            const expected = [
                {event: 'start', data: '{"a":1}', id: '1'},
                {event: 'message',
                 data: '{"content":"caf\\u00e9 \\u2028 \\ud83d\\ude00"}', id: '2'},
                {event: 'message', data: 'no-space\\nsecond line', id: null},
                {event: 'done', data: '{}', id: '3'},
            ];
            const want = JSON.stringify(expected);
            const failures = [];
            for (const [name, text] of [['lf', base], ['crlf', base.replaceAll('\\n', '\\r\\n')],
                                        ['cr', base.replaceAll('\\n', '\\r')]]) {
                for (let i = 0; i <= text.length; i++) {
                    const n = text.length;
                    for (const j of [i, Math.min(n, i + 1), Math.min(n, i + 7)]) {
                        const p = new SSEParser();
                        const got = [...p.feed(text.slice(0, i)), ...p.feed(text.slice(i, j)),
                                     ...p.feed(text.slice(j))];
                        if (JSON.stringify(got) !== want) failures.push(`${name} ${i} ${j}`);
                    }
                }
            }
            // Bytes cut at every offset, through readEvents' streaming TextDecoder.
            const bytes = new TextEncoder().encode(base);
            let byteCases = 0;
            for (let i = 0; i <= bytes.length; i++) {
                const body = new ReadableStream({start(c) {
                    c.enqueue(bytes.slice(0, i)); c.enqueue(bytes.slice(i)); c.close();
                }});
                const got = [];
                await readEvents(new Response(body), (ev) => got.push(ev));
                if (JSON.stringify(got) !== want) failures.push(`bytes ${i}`);
                byteCases++;
            }
            return {failures: failures.slice(0, 10), count: failures.length, byteCases};
        }"""
    )
    assert result["count"] == 0, result["failures"]
    assert result["byteCases"] > 100


async def test_screenshots_light_dark_mobile(
    browser: Browser, http: aiohttp.ClientSession
) -> None:
    """One answered conversation seen in light, dark and phone layouts: saved as artifacts,
    and as the docs' screenshots when TOKENRELAY_UPDATE_SCREENSHOTS=1."""
    async with running_gateway(TOKENRELAY_SIMULATOR_SPEED=SPEED) as gw:
        for question in ("Compare retries and resumes", "Tokens per second by model"):
            async with http.post(gw.base_url + "/api/chat",
                                 json=chat_body(question, "sim-fast")) as resp:
                assert (await read_stream(resp)).terminal[0].event == "done"
        context = await browser.new_context(viewport={"width": 1280, "height": 860})
        chat = await open_chat(context, gw.base_url)
        await chat.ask("How does resuming a stream work?", model="sim-reasoner")
        assert (await chat.wait_answer())["state"] == "complete"
        chat.watch.assert_clean()
        await context.close()

        shots = [
            ("light", {"color_scheme": "light", "viewport": {"width": 1280, "height": 860}}),
            ("dark", {"color_scheme": "dark", "viewport": {"width": 1280, "height": 860}}),
            ("mobile", {"color_scheme": "light", "viewport": {"width": 390, "height": 844},
                        "device_scale_factor": 2, "is_mobile": True, "has_touch": True}),
        ]
        for name, options in shots:
            context = await browser.new_context(**options)
            chat = await open_chat(context, gw.base_url)
            page = chat.page
            item = page.locator("#conv-list .conv-open", has_text="How does resuming")
            if name == "mobile":
                await item.wait_for(state="attached")
                assert await page.locator("#sidebar").is_hidden(), "the sidebar collapses"
                await page.click("#sidebar-toggle")
            await item.click()
            await page.locator("article.msg-assistant .thinking").wait_for()
            if name == "mobile":
                await page.locator("#sidebar").wait_for(state="hidden")
            assert await page.input_value("#model") == "sim-reasoner", "the model it used"
            await page.mouse.move(640, 420)
            await page.evaluate("""() => {
                document.activeElement.blur();
                document.getElementById('messages').scrollTop = 0;
            }""")
            path = await chat.screenshot(f"page-{name}")
            if update_docs():
                DOC_SCREENSHOTS.mkdir(parents=True, exist_ok=True)
                (DOC_SCREENSHOTS / f"{name}.png").write_bytes(path.read_bytes())
            chat.watch.assert_clean()
            await context.close()
