"""The OpenAI API itself: ``POST /v1/chat/completions`` (streaming and not), ``GET /v1/models``.

Official SDKs can use ``http://host:port/v1`` as their ``base_url``. Answers run through the
same hub and journal as the browser protocol; journal frames are re-encoded as
``chat.completion.chunk`` objects. SDK clients do not resume, so a disconnect cancels the
upstream at once (no grace period).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.routing import Route

from tokenrelay import events as ev
from tokenrelay.config import ModelRoute
from tokenrelay.errors import TokenRelayError, UpstreamUnavailable
from tokenrelay.hub import Hub
from tokenrelay.routes.common import Endpoint, JSONResponse, owner_of
from tokenrelay.subscriber import SubscriberResponse
from tokenrelay.validation import read_json_body, validate_chat

_CLIENT_ERRORS = frozenset({400, 404, 413, 422})


def chunk_transform(
    completion_id: str, created: int, model: str, include_usage: bool
) -> Callable[[list[bytes]], bytes]:
    """Re-encode our journal frames as OpenAI streaming chunks."""
    base = {"id": completion_id, "object": "chat.completion.chunk", "created": created,
            "model": model}
    # Every chunk is ``{**base, "choices": [{"index": 0, "delta": ..., "finish_reason":
    # ...}]}``; its bytes are the same as encoding that dict, with the part that never
    # changes encoded once per stream instead of once per token.
    head = b"data: " + ev.dumps(base)[:-1] + b',"choices":[{"index":0,"delta":'
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
                out.append(b": retry in %d ms (%s)\n\n" % (payload["wait_ms"],
                                                          payload["reason"].encode()))
                if payload.get("next_model") and payload["next_model"] != base["model"]:
                    answered_by(payload["next_model"])
            elif name == ev.CONTINUED:
                answered_by(payload["model"])
            elif name == ev.DONE:
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
                error = payload["error"]
                out.append(b"data: " + ev.dumps({"error": {
                    "message": error["message"], "type": "upstream_error",
                    "code": error["code"]}}) + b"\n\n")
        return b"".join(out)

    return transform


async def chat_completions(request: Request) -> Any:
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
        transform = chunk_transform(completion_id, created, chat.route.name, chat.include_usage)
        return SubscriberResponse(hub, gen.stream_id, 0, transform=transform)
    async with hub.subscribed(gen.stream_id):
        waiter = asyncio.ensure_future(gen.finished.wait())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait((waiter, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (waiter, gone):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    if not gen.finished.is_set():
        return JSONResponse({}, status_code=499)  # the client is gone; nobody reads this
    return _completion(gen, completion_id, created, gen.model_used)  # who answered


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


def _completion(gen: Any, completion_id: str, created: int, model: str) -> JSONResponse:
    if gen.state not in (ev.COMPLETE, ev.CANCELLED):
        error = gen.error or TokenRelayError("the answer failed")
        status = error.status if error.status >= 400 else 502
        # The upstream refused the request itself (bad parameter, unknown model): the
        # client's to fix, so a 4xx as OpenAI would answer; its key or health is ours (502).
        if getattr(error, "upstream_status", None) in _CLIENT_ERRORS:
            status = error.upstream_status  # type: ignore[attr-defined]
        headers = {}
        retry_after = getattr(error, "retry_after", None)
        if status == 503 and retry_after is not None:
            headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
        return JSONResponse({"error": {**error.to_dict(), "type": "upstream_error"}},
                            status_code=status, headers=headers)
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
            "model": model,
            "choices": [{"index": 0, "message": message,
                         "finish_reason": gen.finish_reason or "stop"}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion},
        }
    )


async def list_models(request: Request) -> JSONResponse:
    settings = request.app.state.settings
    now = int(time.time())
    data = [
        {"id": r.name, "object": "model", "created": now,
         "owned_by": "tokenrelay-simulator" if r.simulated else r.provider,
         "simulated": r.simulated}
        for r in settings.models.values()
        if settings.route(r.name) is not None  # allowed_models
    ]
    return JSONResponse({"object": "list", "data": data})


routes = [
    Route("/v1/chat/completions", Endpoint(chat_completions), methods=["POST"]),
    Route("/v1/models", list_models, methods=["GET"]),
]
