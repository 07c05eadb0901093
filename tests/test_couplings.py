"""Every private detail of uvicorn, Starlette and asyncio listed in tokenrelay.couplings
still exists in the installed versions; a failure names the attribute and the version."""

from __future__ import annotations

import asyncio
import collections
import importlib
import inspect
import socket
from importlib.metadata import version
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.server import ServerState

from tokenrelay.couplings import COUPLINGS, Coupling


def _installed(package: str) -> str:
    return "Python's" if package == "asyncio" else f"{package} {version(package)}"


async def _live_objects() -> dict[str, Any]:
    """Real instances for the instance attributes: a protocol in the middle of a request."""
    entered = asyncio.Event()
    release = asyncio.Event()
    answered = asyncio.Event()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        entered.set()
        await release.wait()
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        answered.set()

    config = uvicorn.Config(app, http="httptools", lifespan="off", log_config=None)
    config.load()
    loop = asyncio.get_running_loop()
    protocol = HttpToolsProtocol(config, ServerState(), {}, loop)
    ours, theirs = socket.socketpair()
    await loop.connect_accepted_socket(lambda: protocol, ours)
    theirs.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(entered.wait(), 10)
    objects = {
        "asyncio:Event()": asyncio.Event(),
        "asyncio:Future()": loop.create_future(),
        "starlette.applications:Starlette()": Starlette(),
        "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol()": protocol,
        "uvicorn.protocols.http.flow_control:FlowControl()": getattr(protocol, "flow", None),
        "uvicorn.protocols.http.httptools_impl:RequestResponseCycle()": getattr(
            protocol, "cycle", None
        ),
    }
    release.set()
    await asyncio.wait_for(answered.wait(), 10)  # the request ends before its socket closes
    theirs.close()
    return objects


def _owner(coupling: Coupling, live: dict[str, Any]) -> Any:
    if coupling.owner.endswith("()"):
        return live[coupling.owner]
    module, _, name = coupling.owner.partition(":")
    return getattr(importlib.import_module(module), name)


@pytest.fixture
async def live() -> dict[str, Any]:
    return await _live_objects()


@pytest.mark.parametrize("coupling", COUPLINGS, ids=lambda c: f"{c.owner}.{c.attribute}")
async def test_each_private_attribute_tokenrelay_relies_on_still_exists(
    coupling: Coupling, live: dict[str, Any]
):
    owner = _owner(coupling, live)
    assert owner is not None and hasattr(owner, coupling.attribute), (
        f"{_installed(coupling.package)}: {coupling.owner} has no {coupling.attribute!r}, "
        f"which {coupling.used_by} relies on ({coupling.why}); see tokenrelay/couplings.py"
    )


async def test_the_waiters_that_protocol_makes_lean_are_still_deques(live: dict[str, Any]):
    # protocol._lean swaps only a deque it recognises; anything else would silently keep
    # the memory it is there to save.
    cycle = live["uvicorn.protocols.http.httptools_impl:RequestResponseCycle()"]
    flow = live["uvicorn.protocols.http.flow_control:FlowControl()"]
    for event in (cycle.message_event, flow._is_writable_event, asyncio.Event()):
        assert type(event._waiters) is collections.deque, version("uvicorn")


def test_the_inlined_starlette_call_is_still_what_starlette_does():
    # app.TokenRelayApp.__call__ inlines Starlette.__call__; if Starlette's grows a step,
    # ours would skip it.
    body = [
        line.strip()
        for line in inspect.getsource(Starlette.__call__).splitlines()[1:]
        if line.strip()
    ]
    assert body == [
        'scope["app"] = self',
        "if self.middleware_stack is None:",
        "self.middleware_stack = self.build_middleware_stack()",
        "await self.middleware_stack(scope, receive, send)",
    ], f"starlette {version('starlette')} changed Starlette.__call__"


def _send_lines() -> list[str]:
    return [line.strip() for line in inspect.getsource(RequestResponseCycle.send).splitlines()]


def _in_order(lines: list[str], path: list[str]) -> tuple[list[str], int]:
    """The lines of ``path`` not found in ``lines`` each after the one before, and the
    index just past the last one found."""
    missing, at = [], 0
    for line in path:
        if line in lines[at:]:
            at = lines.index(line, at) + 1
        else:
            missing.append(line)
    return missing, at


def test_the_head_that_head_hold_holds_is_still_one_write_after_response_started():
    # protocol._HeadHold holds the cycle's first write once response_started is set (the
    # head) and passes any earlier one (a 100 Continue in receive()): send must still set
    # the flag, then write the whole head in one transport.write; and only receive()
    # writes before it.
    lines = _send_lines()
    missing, at = _in_order(lines, [
        "if not self.response_started:",
        "self.response_started = True",
        'content.append(b"\\r\\n")',
        'self.transport.write(b"".join(content))',
        "elif not self.response_complete:",
    ])
    assert not missing, f"uvicorn {version('uvicorn')} changed the head's write: {missing}"
    head = lines.index("self.response_started = True")
    assert sum("self.transport.write(" in line for line in lines[head:at - 1]) == 1
    receive = inspect.getsource(RequestResponseCycle.receive)
    assert "self.transport.write(" in receive and "100 Continue" in receive


def test_the_body_chunk_that_write_chunk_inlines_is_still_what_send_does():
    # protocol.write_chunk writes a chunk of a chunked response as RequestResponseCycle.send
    # does; if send grows a step on that path (or drains differently), ours would skip it.
    missing, _ = _in_order(_send_lines(), [
        "if self.flow.write_paused and not self.disconnected:",
        "await self.flow.drain()  # pragma: full coverage",
        "if self.disconnected:",
        "return  # pragma: full coverage",
        "if not self.response_started:",
        "elif not self.response_complete:",
        'body = message.get("body", b"")',
        'more_body = message.get("more_body", False)',
        'if self.scope["method"] == "HEAD":',
        "elif self.chunked_encoding:",
        "if body:",
        'content = [b"%x\\r\\n" % len(body), body, b"\\r\\n"]',
        "else:",
        "content = []",
        "if not more_body:",
        'content.append(b"0\\r\\n\\r\\n")',
        'self.transport.write(b"".join(content))',
    ])
    assert not missing, (
        f"uvicorn {version('uvicorn')} changed the body branch of RequestResponseCycle.send "
        f"(missing or moved: {missing})")
