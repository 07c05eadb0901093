"""Chromium's native EventSource on a finished stream stops after the end (issue 13,
part 3): it replays the stream, reconnects once with the terminal event's id, gets
``204 No Content`` and closes for good, instead of reconnecting until retention ends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from playwright.async_api import Browser

from support.client import chat_body, read_stream
from support.gateway import serve_app
from tokenrelay.app import create_app
from tokenrelay.config import load_settings

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]


class RequestCounter:
    """An ASGI wrapper that counts the requests reaching the app, per path."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.paths: list[str] = []
        self.statuses: list[int] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.paths.append(scope["path"])

        async def counting_send(message: Any) -> None:
            if message["type"] == "http.response.start":
                self.statuses.append(message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)


@pytest_asyncio.fixture(loop_scope="module")
async def counted() -> AsyncIterator[tuple[str, RequestCounter]]:
    settings = load_settings(environ={"TOKENRELAY_DATABASE_URL": "none",
                                      "TOKENRELAY_HEARTBEAT_S": "1"})
    counter = RequestCounter(create_app(settings))
    async with serve_app(counter) as base_url:
        yield base_url, counter


# Resolves once the EventSource is CLOSED (it never reconnects after that, by the spec),
# or has reconnected twice, with what the page saw: connections opened, errors, and the
# events with their ids.
FOLLOW = """(url) => new Promise((resolve) => {
    const seen = {opens: 0, errors: 0, events: []};
    const source = new EventSource(url);
    source.onopen = () => { seen.opens += 1; };
    source.onmessage = (e) => seen.events.push(["message", e.lastEventId]);
    for (const name of ["start", "done", "error"]) {
        source.addEventListener(name, (e) => {
            if (e.data !== undefined) seen.events.push([name, e.lastEventId]);
        });
    }
    source.onerror = () => {
        seen.errors += 1;
        const state = source.readyState;
        // A third connection end means it kept reconnecting: stop it and report.
        if (state === EventSource.CLOSED || seen.errors >= 3) {
            source.close();
            resolve({...seen, state});
        }
    };
})"""


async def test_native_eventsource_stops_after_the_end_of_a_finished_stream(
    browser: Browser, counted: tuple[str, RequestCounter]
) -> None:
    base_url, counter = counted
    async with aiohttp.ClientSession() as http:
        async with http.post(base_url + "/api/chat",
                             json=chat_body("hi", "sim-fast", sim={"tokens": 4})) as r:
            stream = await read_stream(r)
            stream_id = r.headers["X-Stream-Id"]
    assert stream.terminal[0].event == "done"
    path = f"/api/streams/{stream_id}/events"
    context = await browser.new_context()
    try:
        page = await context.new_page()
        await page.goto(base_url + "/healthz")  # same origin, no page script
        seen = await page.evaluate(FOLLOW, base_url + path)
    finally:
        await context.close()
    assert seen["state"] == 2  # EventSource.CLOSED
    # The first connection replayed everything; the reconnect carried the done event's id
    # and got 204, which closed the source (one error event per connection end).
    assert seen["opens"] == 1 and seen["errors"] == 2
    assert seen["events"][0] == ["start", "1"]
    assert seen["events"][-1] == ["done", str(stream.last_id)]
    assert len(seen["events"]) == len(stream.events)
    hits = [s for p, s in zip(counter.paths, counter.statuses, strict=True) if p == path]
    assert hits == [200, 204]
