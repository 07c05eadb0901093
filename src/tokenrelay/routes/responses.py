"""The OpenAI Responses API over any chat-completions upstream: ``/v1/responses``.

``POST /v1/responses`` translates the request (:mod:`tokenrelay.responses_api`) and starts
an ordinary generation; the journal holds its frames, and every reader folds them into
Responses events or the ``response`` object. So ``background: true`` is nothing more than
"no grace cancel": the answer runs whoever is connected, ``GET /v1/responses/{id}`` reads
its state from the journal (any instance, with the Redis journal), and
``GET /v1/responses/{id}?stream=true&starting_after=N`` (or ``Last-Event-ID: N``) replays
the events after N and follows live, with the same sequence numbers every time.

Retention: a response lives exactly as long as its journal stream (``retention_s`` after
it ends, default 600 s, and within the journal's ``max_streams``); ``DELETE`` forgets it
at once. ``store: false`` responses are streamed or returned but not retrievable.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tokenrelay import events as ev
from tokenrelay.asgi import ASGIApp
from tokenrelay.errors import BadRequest, StreamNotFound, TokenRelayError
from tokenrelay.hub import Hub
from tokenrelay.journal.base import Journal, StreamInfo
from tokenrelay.responses_api import (
    HEARTBEAT,
    META_KEY,
    ResponseFolder,
    encode,
    input_items,
    item_ref,
    output_messages,
    parse_request,
    response_id,
    stream_id_of,
)
from tokenrelay.routes.common import JSONResponse, error_response, owner_of
from tokenrelay.subscriber import SubscriberResponse
from tokenrelay.validation import parse_last_event_id, read_json_body

_CLIENT_ERRORS = frozenset({400, 404, 413, 422})
_CANCEL_WAIT_S = 10.0


def openai_error(exc: TokenRelayError, status: int | None = None) -> JSONResponse:
    """Our error in OpenAI's shape (one mapping for all of ``/v1``: ``errors.openai_error``)."""
    return error_response(exc, openai=True, status=status)


def _openai_errors(
    func: Callable[[Request], Awaitable[ASGIApp]],
) -> Callable[[Request], Awaitable[ASGIApp]]:
    async def endpoint(request: Request) -> ASGIApp:
        try:
            return await func(request)
        except TokenRelayError as exc:
            return openai_error(exc)

    endpoint.__name__ = func.__name__
    return endpoint


def _not_found(resp_id: str, param: str | None = None) -> StreamNotFound:
    error = StreamNotFound(f"No response found with id '{resp_id[:100]}' (unknown, expired, "
                           "deleted, not stored, or not yours)")
    error.param = param
    return error


async def _lookup(request: Request, resp_id: str, param: str | None = None) -> StreamInfo:
    """The journal info of one of the caller's stored responses, else a 404."""
    hub: Hub = request.app.state.hub
    stream_id = stream_id_of(resp_id)
    if stream_id is None:
        raise _not_found(resp_id, param)
    try:
        info = await hub.info(stream_id, owner_of(request))
    except StreamNotFound:
        raise _not_found(resp_id, param) from None
    responses = info.meta.get(META_KEY)
    if not isinstance(responses, dict) or not responses.get("store", True):
        raise _not_found(resp_id, param)
    return info


async def _read(journal: Journal, stream_id: str, wait_s: float = 0.0) -> list[bytes]:
    """Every frame of the stream so far; waits up to ``wait_s`` for its end."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    frames: list[bytes] = []
    while True:
        result = await journal.read(stream_id, len(frames), max(0.0, deadline - loop.time()))
        frames += result.frames
        if result.finished or (not result.frames and loop.time() >= deadline):
            return frames


async def _folded(journal: Journal, info: StreamInfo, wait_s: float = 0.0) -> ResponseFolder:
    folder = ResponseFolder(info.stream_id, info.meta)
    folder.feed(await _read(journal, info.stream_id, wait_s))
    folder.sync()
    return folder


def _events(hub: Hub, stream_id: str, meta: dict[str, Any], after: int) -> SubscriberResponse:
    """Responses events of the stream, those after sequence number ``after``, then live."""
    folder = ResponseFolder(stream_id, meta)

    def transform(frames: list[bytes]) -> bytes:
        return encode(folder.feed(frames), after)

    # Sequence numbers restart from the journal's first frame: the fold is deterministic.
    return SubscriberResponse(hub, stream_id, 0, transform=transform, heartbeat=HEARTBEAT)


async def _history(request: Request, previous: Any) -> list[dict[str, Any]]:
    """The conversation of ``previous_response_id``: its input, then its output."""
    if not isinstance(previous, str):
        error = BadRequest("'previous_response_id' must be a response id",
                           code="invalid_parameter")
        error.param = "previous_response_id"
        raise error
    info = await _lookup(request, previous, "previous_response_id")
    if not info.finished:
        error = BadRequest(f"Previous response '{previous}' is still in progress",
                           code="previous_response_in_progress")
        error.param = "previous_response_id"
        raise error
    folder = await _folded(request.app.state.hub.journal, info)
    messages: list[dict[str, Any]] = info.meta[META_KEY].get("messages") or []
    return messages + output_messages(folder.output)


async def _resolve_references(request: Request, items: list[Any]) -> list[Any]:
    """``item_reference`` input items replaced by the output items they name (the Vercel
    AI SDK sends them for earlier assistant turns when ``store`` is on)."""
    out: list[Any] = []
    folded: dict[str, ResponseFolder] = {}
    for i, item in enumerate(items):
        if not isinstance(item, dict) or item.get("type") != "item_reference":
            out.append(item)
            continue
        ref = item_ref(item.get("id"))
        if ref is None:
            raise _not_found(str(item.get("id")), f"input[{i}].id")
        stream_id, index = ref
        folder = folded.get(stream_id)
        if folder is None:
            info = await _lookup(request, response_id(stream_id), f"input[{i}].id")
            folder = folded[stream_id] = await _folded(request.app.state.hub.journal, info)
        if index >= len(folder.output):
            raise _not_found(str(item["id"]), f"input[{i}].id")
        out.append(folder.output[index])
    return out


async def create_response(request: Request) -> Response | SubscriberResponse:
    state = request.app.state
    hub: Hub = state.hub
    data = await read_json_body(request, state.settings.limits)
    history = None
    if isinstance(data, dict) and data.get("previous_response_id") is not None:
        history = await _history(request, data["previous_response_id"])
    if isinstance(data, dict) and isinstance(data.get("input"), list):
        data["input"] = await _resolve_references(request, data["input"])
    req = parse_request(data, state.settings, history)
    owner = owner_of(request)
    lease = await state.limiter.acquire(owner)
    try:
        gen = await hub.start(owner=owner, route=req.route, body=req.upstream_body(),
                              grace_s=math.inf if req.background else 0.0, lease=lease,
                              meta=req.meta())
    except BaseException:
        await lease.finish()
        raise
    meta = {**req.meta(), "created": int(gen.created), "model": req.route.name}
    if req.stream:
        # The status first: an upstream that refuses the request is an HTTP error the SDK
        # raises (as OpenAI answers), not a 200 with an in-band failure.
        await _first_output(hub, gen, state.settings.heartbeat_s)
        failed = _failure(gen) if gen.finished.is_set() else None
        return failed or _events(hub, gen.stream_id, meta, -1)
    if not req.background:
        async with hub.subscribed(gen.stream_id):  # a client gone cancels (grace 0)
            await _until_finished(request, gen)
        if not gen.finished.is_set():
            return JSONResponse({}, status_code=499)  # the client is gone; nobody reads this
        failed = _failure(gen)
        if failed is not None:
            return failed
    folder = ResponseFolder(gen.stream_id, meta)
    folder.feed(await _read(hub.journal, gen.stream_id))
    return JSONResponse(folder.snapshot())


async def _first_output(hub: Hub, gen: Any, budget_s: float) -> None:
    """Wait until the answer has output (not a retry notice) or has ended, at most
    ``budget_s`` (the heartbeat period: no longer than a client waits for a heartbeat)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget_s
    after = 1  # the start frame
    while not gen.finished.is_set() and loop.time() < deadline:
        result = await hub.journal.read(gen.stream_id, after, deadline - loop.time())
        if any(ev.parse_frame(raw)[1] != ev.RETRY for raw in result.frames):
            return
        after += len(result.frames)


async def _until_finished(request: Request, gen: Any) -> None:
    waiter = asyncio.ensure_future(gen.finished.wait())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((waiter, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (waiter, gone):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _failure(gen: Any) -> JSONResponse | None:
    """A failed answer without any output: the HTTP error OpenAI would answer."""
    if gen.state in (ev.COMPLETE, ev.CANCELLED) or gen.text or gen.tool_calls:
        return None
    error = gen.error or TokenRelayError("the answer failed")
    status = error.status if error.status >= 400 else 502
    # The upstream refused the request itself (bad parameter, unknown model): the
    # client's to fix, so a 4xx as OpenAI would answer; its key or health is ours (502).
    upstream_status = getattr(error, "upstream_status", None)
    if upstream_status in _CLIENT_ERRORS:
        status = upstream_status
    return openai_error(error, status)


async def retrieve_response(request: Request) -> Response | SubscriberResponse:
    info = await _lookup(request, request.path_params["response_id"])
    hub: Hub = request.app.state.hub
    query = request.query_params
    if query.get("stream", "").lower() in ("true", "1"):
        given = query.get("starting_after") or request.headers.get("last-event-id")
        # Sequence numbers start at 0, so "after nothing" is -1.
        after = -1 if given is None else parse_last_event_id(given)
        request.app.state.metrics.resumed()
        return _events(hub, info.stream_id, info.meta, after)
    return JSONResponse((await _folded(hub.journal, info)).snapshot())


async def list_input_items(request: Request) -> JSONResponse:
    """The response's own input (not the earlier turns), as OpenAI's cursor page."""
    info = await _lookup(request, request.path_params["response_id"])
    stored = info.meta[META_KEY]
    items = input_items(stored.get("messages", [])[stored.get("input_from", 0):],
                        info.stream_id)
    query = request.query_params
    order = query.get("order", "desc")
    limit = query.get("limit", "20")
    if order not in ("asc", "desc") or not limit.isdigit() or not 1 <= int(limit) <= 100:
        error = BadRequest("'order' must be asc or desc and 'limit' between 1 and 100",
                           code="invalid_parameter")
        error.param = "order" if order not in ("asc", "desc") else "limit"
        raise error
    if order == "desc":
        items.reverse()
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise _not_found(after, "after")
        items = items[ids.index(after) + 1:]
    page = items[:int(limit)]
    return JSONResponse({"object": "list", "data": page,
                         "first_id": page[0]["id"] if page else None,
                         "last_id": page[-1]["id"] if page else None,
                         "has_more": len(items) > len(page)})


async def cancel_response(request: Request) -> JSONResponse:
    resp_id = request.path_params["response_id"]
    info = await _lookup(request, resp_id)
    if not info.meta[META_KEY].get("background"):
        raise BadRequest("Only responses created with background=true can be cancelled",
                         code="not_background")
    hub: Hub = request.app.state.hub
    if not info.finished:
        await _stop(request, info)
    return JSONResponse((await _folded(hub.journal, info)).snapshot())


async def _stop(request: Request, info: StreamInfo) -> None:
    """Cancel the answer and wait (a bounded time) for its end.

    The cancel is asked again every second: in a cluster it travels by pub/sub, which
    drops a message that an owner not yet (re)subscribed would miss.
    """
    hub: Hub = request.app.state.hub
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _CANCEL_WAIT_S
    while loop.time() < deadline:
        with contextlib.suppress(StreamNotFound):
            await hub.cancel(info.stream_id, owner_of(request))
        frames = await _read(hub.journal, info.stream_id, min(1.0, deadline - loop.time()))
        if frames and ev.parse_frame(frames[-1])[1] in (ev.DONE, ev.ERROR):
            return


async def delete_response(request: Request) -> JSONResponse:
    resp_id = request.path_params["response_id"]
    info = await _lookup(request, resp_id)
    hub: Hub = request.app.state.hub
    if not info.finished:  # stop the upstream first: nothing may write to it afterwards
        await _stop(request, info)
    await hub.journal.delete(info.stream_id)
    return JSONResponse({"id": response_id(info.stream_id), "object": "response.deleted",
                         "deleted": True})


routes = [
    Route("/v1/responses", _openai_errors(create_response), methods=["POST"]),
    Route("/v1/responses/{response_id}", _openai_errors(retrieve_response), methods=["GET"]),
    Route("/v1/responses/{response_id}", _openai_errors(delete_response), methods=["DELETE"]),
    Route("/v1/responses/{response_id}/cancel", _openai_errors(cancel_response),
          methods=["POST"]),
    Route("/v1/responses/{response_id}/input_items", _openai_errors(list_input_items),
          methods=["GET"]),
]
