"""Helpers for the browser suite: a watched chat page and the API's ground truth."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from playwright.async_api import BrowserContext, Page

from support.client import read_stream

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
DOC_SCREENSHOTS = ROOT / "docs" / "screenshots"
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
FINAL_STATES = ("complete", "cancelled", "error", "interrupted")


@dataclass
class Watch:
    """What a page did that it must not: dialogs, console/page errors, foreign requests."""

    dialogs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def attach(self, page: Page) -> None:
        page.on("dialog", self._on_dialog)
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("request", self._on_request)

    async def _on_dialog(self, dialog: Any) -> None:
        self.dialogs.append(f"{dialog.type}: {dialog.message}")
        await dialog.dismiss()

    def _on_request(self, request: Any) -> None:
        url = request.url
        self.requests.append(url)
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob", "about"):
            return
        if parts.hostname not in LOOPBACK:
            self.foreign.append(url)

    def assert_clean(self, allow_errors: Iterable[str] = ()) -> None:
        allowed = tuple(allow_errors)
        errors = [e for e in self.errors if not any(a in e for a in allowed)]
        assert self.dialogs == [], f"a dialog opened (script ran): {self.dialogs}"
        assert errors == [], f"console errors: {errors}"
        assert self.foreign == [], f"requests left loopback: {self.foreign}"


@dataclass
class ChatPage:
    """One tab of the chat page, with helpers that wait on the page's own state."""

    page: Page
    watch: Watch
    base_url: str

    async def ready(self) -> None:
        await self.page.wait_for_selector("body[data-ready=true]", state="attached")

    async def ask(self, text: str, model: str | None = None) -> None:
        if model is not None:
            await self.page.select_option("#model", model)
        await self.page.fill("#input", text)
        await self.page.press("#input", "Enter")

    async def answer(self, index: int = -1) -> dict[str, Any]:
        """The state of an answer as the page holds it (message object, not DOM)."""
        result: dict[str, Any] = await self.page.evaluate(
            """(i) => {
                const all = [...document.querySelectorAll('article.msg-assistant')];
                const a = all.at(i);
                if (!a) return null;
                const m = a.tokenrelay;
                const badge = a.querySelector('.badge');
                return {state: m.state, content: m.content, reasoning: m.reasoning,
                        stream_id: m.stream_id, model: m.model, last_seq: m.last_seq,
                        shown: a.querySelector('.md').innerText,
                        badge: badge.hidden ? '' : badge.textContent};
            }""",
            index,
        )
        return result

    async def wait_answer(self, *, states: Iterable[str] = FINAL_STATES,
                          timeout: float = 30_000) -> dict[str, Any]:
        await self.page.wait_for_function(
            """(states) => {
                const a = [...document.querySelectorAll('article.msg-assistant')].at(-1);
                return a && states.includes(a.dataset.state);
            }""",
            arg=list(states),
            timeout=timeout,
        )
        return await self.answer()

    async def wait_text(self, min_chars: int, timeout: float = 20_000) -> dict[str, Any]:
        """Wait until the last answer holds at least ``min_chars`` characters of text."""
        try:
            await self.page.wait_for_function(
                """(n) => {
                    const a = [...document.querySelectorAll('article.msg-assistant')].at(-1);
                    return a && a.tokenrelay.content.length >= n;
                }""",
                arg=min_chars,
                timeout=timeout,
            )
        except Exception:
            await self.screenshot("failed-wait-text")
            raise AssertionError(f"no text: {await self.answer()} {self.watch}") from None
        return await self.answer()

    async def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        await self.page.screenshot(path=str(path))
        return path


async def open_chat(context: BrowserContext, base_url: str) -> ChatPage:
    page = await context.new_page()
    watch = Watch()
    watch.attach(page)
    await page.goto(base_url + "/")
    chat = ChatPage(page, watch, base_url)
    await chat.ready()
    return chat


async def replayed(http: aiohttp.ClientSession, base_url: str, stream_id: str) -> Any:
    """Every event of a stream, read again from seq 0 through the API (the ground truth)."""
    url = f"{base_url}/api/streams/{stream_id}/events"
    async with http.get(url, headers={"Last-Event-ID": "0"}) as resp:
        assert resp.status == 200
        return await read_stream(resp)


async def stream_info(http: aiohttp.ClientSession, base_url: str, stream_id: str) -> Any:
    async with http.get(f"{base_url}/api/streams/{stream_id}") as resp:
        assert resp.status == 200
        return await resp.json()


def update_docs() -> bool:
    """Commit-ready screenshots are rewritten only when asked (they are tracked files)."""
    return os.environ.get("TOKENRELAY_UPDATE_SCREENSHOTS") == "1"
