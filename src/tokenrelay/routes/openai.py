"""The OpenAI API itself: ``POST /v1/chat/completions`` (streaming and not),
``GET /v1/models`` and ``GET /v1/models/{id}``.

Official SDKs can use ``http://host:port/v1`` as their ``base_url``. Answers run through the
same hub and journal as the browser protocol; journal frames are re-encoded as
``chat.completion.chunk`` objects. SDK clients do not resume, so a disconnect cancels the
upstream at once (no grace period).

The HTTP status of a streaming call waits for the upstream's verdict (retries and
fallbacks first): a request no route accepted is a real 4xx/5xx in OpenAI's error shape,
which SDKs raise as ``BadRequestError`` and so on; once a route answered 200, the SSE
response starts and heartbeats carry it while the model thinks. ``model`` in chunks and
bodies is the model that answered (after a fallback, the fallback).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tokenrelay import events as ev
from tokenrelay.asgi import ON_DISCONNECT, Disconnect
from tokenrelay.config import ModelRoute
from tokenrelay.errors import (
    BadRequest,
    ServiceUnavailable,
    UpstreamError,
    UpstreamUnavailable,
    openai_error_body,
)
from tokenrelay.generation import CANCEL_ABANDONED, Generation
from tokenrelay.hub import Hub
from tokenrelay.routes.common import Endpoint, JSONResponse, error_response, owner_of
from tokenrelay.subscriber import SubscriberResponse
from tokenrelay.validation import read_json_body, validate_chat

# Upstream refusals relayed with their own status: the request is the client's to fix (or,
# for 429, to retry later). Any other upstream failure (its key, its health) is ours: 502.
_CLIENT_ERRORS = frozenset({400, 404, 413, 422, 429})


def chunk_transform(
    completion_id: str, created: int, model: str, include_usage: bool
) -> Callable[[list[bytes]], bytes]:
    """Re-encode our journal frames as OpenAI streaming chunks.

    ``model`` is the model that accepted the request; a ``retry`` frame that falls back
    (after acceptance, rare) switches it, so every chunk names the model that answered."""
    base: dict[str, Any] = {}
    head = b""

    def use_model(name: str) -> None:
        nonlocal base, head
        base = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
                "model": name}
        # Every chunk is ``{**base, "choices": [{"index": 0, "delta": ..., "finish_reason":
        # ...}]}``; its bytes are the same as encoding that dict, with the part that never
        # changes encoded once per model instead of once per token.
        head = b"data: " + ev.dumps(base)[:-1] + b',"choices":[{"index":0,"delta":'

    use_model(model)
    open_tail = b',"finish_reason":null}]}\n\n'

    def answered_by(name: str) -> None:
        """Chunks after a fallback or a continuation name the model answering now."""
        nonlocal head
        base["model"] = name
        head = b"data: " + ev.dumps(base)[:-1] + b',"choices":[{"index":0,"delta":'

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        tail = open_tail if finish is None else (
            b',"finish_reason":' + ev.dumps(finish) + b"}]}\n\n")
        return head + ev.dumps(delta) + tail

    def transform(frames: list[bytes]) -> bytes:
        out: list[bytes] = []
        for raw in frames:
            _, name, data = ev.parse_frame(raw)
            if name is None:
                out.append(chunk({"content": orjson.loads(data)["content"]}))
                continue
            payload = orjson.loads(data)
            if name == ev.START:
                out.append(chunk({"role": "assistant", "content": ""}))
            elif name == ev.REASONING:
                out.append(chunk({"reasoning_content": payload["reasoning"]}))
            elif name == ev.TOOL_CALL:
                call: dict[str, Any] = {"index": payload["index"], "type": "function",
                                        "function": {"arguments": payload["arguments"]}}
                if payload.get("id"):
                    call["id"] = payload["id"]
                if payload.get("name"):
                    call["function"]["name"] = payload["name"]
                out.append(chunk({"tool_calls": [call]}))
            elif name == ev.RETRY:
                if payload.get("next_model") and payload["next_model"] != base["model"]:
                    use_model(payload["next_model"])
                out.append(b": retry in %d ms (%s)\n\n" % (payload["wait_ms"],
                                                          payload["reason"].encode()))
                if payload.get("next_model") and payload["next_model"] != base["model"]:
                    answered_by(payload["next_model"])
            elif name == ev.CONTINUED:
                answered_by(payload["model"])
            elif name == ev.DONE:
                if payload.get("model") and payload["model"] != base["model"]:
                    use_model(payload["model"])
                reason = payload.get("finish_reason") or "stop"
                out.append(chunk({}, reason))
                if include_usage:
                    usage = payload["usage"]
                    body = {**base, "choices": [], "usage": {
                        "prompt_tokens": usage.get("prompt_tokens") or 0,
                        "completion_tokens": usage.get("completion_tokens") or 0,
                        "total_tokens": usage.get("total_tokens")
                        or (usage.get("prompt_tokens") or 0)
                        + (usage.get("completion_tokens") or 0),
                    }}
                    out.append(b"data: " + ev.dumps(body) + b"\n\n")
                out.append(b"data: [DONE]\n\n")
            elif name == ev.ERROR:
                # After the 200: in-band, as OpenAI does (the SDKs raise an APIError).
                error = payload["error"]
                out.append(b"data: " + ev.dumps(openai_error_body(
                    error["message"], error["code"], 502)) + b"\n\n")
        return b"".join(out)

    return transform


async def chat_completions(request: Request) -> Response | SubscriberResponse:
    settings = request.app.state.settings
    hub: Hub = request.app.state.hub
    data = await read_json_body(request, settings.limits)
    chat = validate_chat(data, settings, default_stream=False)  # as OpenAI's API
    await _check_breakers(request, chat.route)
    lease = await request.app.state.limiter.acquire(owner_of(request))
    try:
        gen = await hub.start(
            owner=owner_of(request),
            route=chat.route,
            body=chat.upstream_body(),
            grace_s=0.0,
            lease=lease,
        )
    except BaseException:
        await lease.finish()
        raise
    completion_id = "chatcmpl-" + gen.stream_id
    created = int(gen.created)
    if chat.stream:
        # No status line before the upstream's verdict (see the module docstring).
        if not await _until(request, gen, gen.answered()):
            return JSONResponse({}, status_code=499)  # the client is gone; nobody reads this
        if not gen.accepted:
            return _failure(gen)
        transform = chunk_transform(completion_id, created, gen.model_used, chat.include_usage)
        return SubscriberResponse(hub, gen.stream_id, 0, transform=transform)
    if not await _until(request, gen, gen.finished):
        return JSONResponse({}, status_code=499)
    return _completion(gen, completion_id, created)


async def _until(request: Request, gen: Generation, flag: Any) -> bool:
    """Wait for ``flag``; False (and the answer cancelled) if the client leaves first.

    One future woken by callbacks: the flag's, and our protocol's disconnect callback
    (a task waits in ``receive()`` only under another server)."""
    if flag.is_set():
        return True
    woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def wake(*_: object) -> None:
        if not woken.done():
            woken.set_result(None)

    answered = flag.future()
    answered.add_done_callback(wake)
    hook: Disconnect | None = request.scope.get(ON_DISCONNECT)
    listening = None
    if hook is None:
        listening = asyncio.ensure_future(_disconnected(request))
        listening.add_done_callback(wake)
    elif hook.gone:
        wake()
    else:
        hook.callbacks.append(wake)
    try:
        await woken
    finally:
        answered.remove_done_callback(wake)
        if listening is not None:
            listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listening
        elif hook is not None and wake in hook.callbacks:
            hook.callbacks.remove(wake)
    if flag.is_set():
        return True
    # Nobody subscribed yet, so no grace timer runs: cancel here (SDKs do not resume).
    gen.cancel(CANCEL_ABANDONED)
    return False


async def _check_breakers(request: Request, route: ModelRoute) -> None:
    """Every route of the model paused by its circuit breaker: a 503 with Retry-After
    before anything starts (the stream's 200 would come too early to say it)."""
    settings = request.app.state.settings
    breakers = request.app.state.upstream.breakers
    names = [route.name, *route.fallbacks]
    routes = [r for r in (settings.route(n) for n in names) if r is not None]
    waits = [await breakers.peek(r) for r in routes]
    if routes and all(w is not None for w in waits):
        raise UpstreamUnavailable(
            "every route of this model is paused after repeated failures",
            retry_after=min(w for w in waits if w is not None),
        )


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _failure(gen: Generation) -> JSONResponse:
    """A failed answer as an OpenAI error with the matching HTTP status."""
    error = gen.error
    if error is None:  # interrupted: the server is shutting down
        error = ServiceUnavailable("the server shut down before the answer was complete")
    status = error.status if error.status >= 400 else 502
    # The upstream refused the request itself (bad parameter, unknown model, throttled):
    # answered with its status, as OpenAI would; its key or health is ours (502).
    upstream_status = getattr(error, "upstream_status", None)
    if isinstance(error, UpstreamError) and upstream_status in _CLIENT_ERRORS:
        status = upstream_status
    return error_response(error, openai=True, status=status)


def _completion(gen: Generation, completion_id: str, created: int) -> JSONResponse:
    if gen.state not in (ev.COMPLETE, ev.CANCELLED):
        return _failure(gen)
    message: dict[str, Any] = {"role": "assistant", "content": "".join(gen.text)}
    if gen.reasoning:
        message["reasoning_content"] = "".join(gen.reasoning)
    if gen.tool_calls:
        message["tool_calls"] = [
            {"id": c["id"], "type": "function",
             "function": {"name": c["name"], "arguments": c["arguments"]}}
            for _, c in sorted(gen.tool_calls.items())
        ]
    usage = gen.usage
    prompt = usage.prompt_tokens if usage else 0
    completion = gen.completion_tokens()
    return JSONResponse(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": gen.model_used,
            "choices": [{"index": 0, "message": message,
                         "finish_reason": gen.finish_reason or "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion},
        }
    )


def _model_object(route: ModelRoute, created: int) -> dict[str, Any]:
    return {"id": route.name, "object": "model", "created": created,
            "owned_by": "tokenrelay-simulator" if route.simulated else route.provider,
            "simulated": route.simulated}


async def list_models(request: Request) -> JSONResponse:
    settings = request.app.state.settings
    now = int(time.time())
    data = [
        _model_object(r, now)
        for r in settings.models.values()
        if settings.route(r.name) is not None  # allowed_models
    ]
    return JSONResponse({"object": "list", "data": data})


async def retrieve_model(request: Request) -> JSONResponse:
    """``GET /v1/models/{id}``: a configured model, or (passthrough) one the upstream lists."""
    settings = request.app.state.settings
    model_id: str = request.path_params["model_id"]
    route = settings.route(model_id)
    if route is not None and model_id not in settings.models:
        # A passthrough upstream takes any name; only one it lists is a model.
        provider = settings.providers[route.provider]
        listed = await request.app.state.upstream.list_models(provider)
        if not any(m["id"] == model_id for m in listed):
            route = None
    if route is None:
        raise BadRequest(f"the model {model_id!r} does not exist", code="model_not_found",
                         status=404, param="model")
    return JSONResponse(_model_object(route, int(time.time())))


routes = [
    Route("/v1/chat/completions", Endpoint(chat_completions), methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
    Route("/v1/models/{model_id:path}", retrieve_model, methods=["GET"]),
]
