"""Every private detail of another package that tokenrelay relies on, in one list.

tokenrelay reaches past the public API of uvicorn, Starlette and asyncio in a few places,
each for speed or memory on the per-stream path (see the module named in ``used_by``).
A release that renames one of them would break production silently, so
``tests/test_couplings.py`` checks each entry against the installed versions and fails
naming the attribute and the version. pyproject.toml caps uvicorn and Starlette at the
newest minor release tested; to lift a cap, raise it, run that test, and fix what it names.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["COUPLINGS", "Coupling"]


@dataclass(frozen=True)
class Coupling:
    """One private attribute: ``owner`` (``package:Class`` or ``package:Class()`` for an
    instance attribute that a live object is needed to see) has ``attribute``."""

    package: str
    owner: str
    attribute: str
    used_by: str
    why: str


_PROTOCOL = "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol"
_CYCLE = "uvicorn.protocols.http.httptools_impl:RequestResponseCycle()"
_OURS = "protocol.StreamingHttpToolsProtocol"


def _same(owner: str, attributes: tuple[str, ...], why: str) -> tuple[Coupling, ...]:
    """Several attributes of one uvicorn owner that protocol.py relies on for one reason."""
    return tuple(Coupling("uvicorn", owner, name, _OURS, why) for name in attributes)


COUPLINGS: tuple[Coupling, ...] = (
    Coupling(
        "asyncio", "asyncio:Event()", "_waiters", "protocol._lean",
        "an Event's empty waiter deque (~760 bytes) becomes a list",
    ),
    Coupling(
        "asyncio", "asyncio:Future()", "_asyncio_future_blocking",
        "subscriber._finish_suspended",
        "a send driven by hand that suspended on a future is finished in the subscriber's task",
    ),
    Coupling(
        "uvicorn", "uvicorn.server:Server", "capture_signals", "server.InLoopServer",
        "in-loop servers (the built-in simulator) leave SIGTERM to the gateway",
    ),
    Coupling(
        "uvicorn", "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol()", "pipeline",
        "protocol.StreamingHttpToolsProtocol", "the pipelined-request deque becomes a list",
    ),
    Coupling(
        "uvicorn", "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol()", "flow",
        "protocol.StreamingHttpToolsProtocol", "its writable event is made lean",
    ),
    Coupling(
        "uvicorn", "uvicorn.protocols.http.flow_control:FlowControl()", "_is_writable_event",
        "protocol.StreamingHttpToolsProtocol", "an asyncio.Event made lean per connection",
    ),
    Coupling(
        "uvicorn", "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol()", "cycle",
        "protocol.StreamingHttpToolsProtocol", "the request cycle gets the Disconnect hook",
    ),
    Coupling(
        "uvicorn", "uvicorn.protocols.http.httptools_impl:RequestResponseCycle()",
        "message_event", "protocol.StreamingHttpToolsProtocol",
        "an asyncio.Event made lean per request",
    ),
    Coupling(
        "uvicorn", "uvicorn.protocols.http.httptools_impl:RequestResponseCycle()",
        "disconnected", "protocol.StreamingHttpToolsProtocol",
        "connection_lost fires the Disconnect callbacks only mid-response",
    ),
    Coupling(
        "uvicorn", "uvicorn.protocols.http:httptools_impl", "STATUS_LINE",
        "protocol.StreamingHttpToolsProtocol", "the status lines of the 408/431/400 answers",
    ),
    Coupling(
        "starlette", "starlette.applications:Starlette()", "middleware_stack", "app.TokenRelayApp",
        "Starlette.__call__ is inlined (scope['app'], lazy build_middleware_stack)",
    ),
    *_same(_PROTOCOL + "()", ("config", "loop", "headers", "transport"),
           "read by the head limits (header timeout and count, lingering close)"),
    *_same(_PROTOCOL, ("on_message_begin", "on_header", "on_body", "on_message_complete",
                       "on_response_complete", "send_400_response"),
           "overridden or called by the head limits and the JSON 400"),
    *_same(_CYCLE, ("more_body", "response_complete"),
           "the unread body drained after an early answer"),
    Coupling(
        "uvicorn", "uvicorn.protocols.http:httptools_impl", "RequestResponseCycle",
        "protocol.chunk_cycle", "the send whose body chunks write_chunk may write itself",
    ),
    *(Coupling("uvicorn", _CYCLE, name, "protocol.write_chunk",
               "a pushed body chunk skips the send coroutine (its body branch, inlined)")
      for name in ("disconnected", "flow", "chunked_encoding", "response_complete",
                   "transport")),
    *(Coupling("uvicorn", _CYCLE, name, "protocol._HeadHold",
               "the response's head waits for its first body bytes (one write)")
      for name in ("transport", "response_started", "response_complete")),
    *(Coupling("uvicorn", _CYCLE, name, "validation.read_json_body",
               "a body uvicorn already holds whole is read without a timer")
      for name in ("more_body", "message_event")),
    Coupling(
        "uvicorn", "uvicorn.protocols.http.flow_control:FlowControl()", "write_paused",
        "protocol.write_chunk", "a paused transport leaves the chunk to send (it drains)",
    ),
)
