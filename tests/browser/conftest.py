"""The browser suite: Debian's headless Chromium, driven by Playwright, against a live gateway.

The gateways are the real app under uvicorn with the built-in simulator and SQLite
history; each test gets its own browser context. A :class:`Watch` on each page
records what must never happen: a dialog (script ran), a console error or page error, and
any request to a host that is not loopback.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from chatpage import ChatPage, open_chat
from playwright.async_api import Browser, BrowserContext, async_playwright

from support.gateway import Gateway, running_gateway

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]

# Speeds of the built-in simulator (x its ~60 tokens/s): fast enough for a quick suite,
# slow enough that an answer is visibly in progress for a second or more.
SPEED_NORMAL = "3"
SPEED_SLOW = "1"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if Path(str(item.fspath)).is_relative_to(here):
            item.add_marker(pytest.mark.browser)


# The browser and the two gateways are shared by the tests of a module (each start costs
# about 1.5 s); every test still gets its own browser context, so tabs, storage and
# connections never leak between tests. Tests that need an empty history start their own.
MODULE = {"scope": "module", "loop_scope": "module"}


@pytest_asyncio.fixture(**MODULE)
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()


@pytest_asyncio.fixture(**MODULE)
async def live() -> AsyncIterator[Gateway]:
    """A gateway with the built-in simulator at a brisk speed and 1 s heartbeats."""
    async with running_gateway(
        TOKENRELAY_SIMULATOR_SPEED=SPEED_NORMAL, TOKENRELAY_HEARTBEAT_S="1"
    ) as gw:
        yield gw


@pytest_asyncio.fixture(**MODULE)
async def slow_live() -> AsyncIterator[Gateway]:
    """A gateway whose answers take several seconds (for Stop, reload and offline)."""
    async with running_gateway(
        TOKENRELAY_SIMULATOR_SPEED=SPEED_SLOW, TOKENRELAY_HEARTBEAT_S="1"
    ) as gw:
        yield gw


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@pytest_asyncio.fixture(loop_scope="module")
async def chat_factory(browser: Browser) -> AsyncIterator[Callable[..., Any]]:
    """``await chat_factory(base_url, **context_options)`` -> ChatPage in a new context."""
    contexts: list[BrowserContext] = []

    async def make(base_url: str, **options: Any) -> ChatPage:
        options.setdefault("viewport", {"width": 1280, "height": 860})
        context = await browser.new_context(**options)
        contexts.append(context)
        return await open_chat(context, base_url)

    yield make
    for context in contexts:
        await context.close()
