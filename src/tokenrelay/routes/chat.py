"""``POST /api/chat`` (start an answer and follow it), ``GET /api/models``, ``GET /api/config``."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tokenrelay.diagnose import probe_models, safe_url
from tokenrelay.errors import BadRequest, ServiceUnavailable, StreamNotFound, TokenRelayError
from tokenrelay.hub import Hub, new_id, new_sortable_id
from tokenrelay.idempotency import check_key, fingerprint
from tokenrelay.routes.common import Endpoint, JSONResponse, header, owner_of
from tokenrelay.store.base import Turn
from tokenrelay.subscriber import SubscriberResponse
from tokenrelay.validation import ChatRequest, read_json_body, validate_chat
from tokenrelay.version import __version__

log = logging.getLogger("tokenrelay.routes")
_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,100}")
_EXTRA_FIELDS = frozenset({"conversation_id"})


def _title(messages: list[dict[str, Any]]) -> str:
    for msg in reversed(messages):
        if msg["role"] == "user" and isinstance(msg["content"], str):
            text = " ".join(msg["content"].split())
            return (text[:60] + "…") if len(text) > 60 else (text or "New chat")
    return "New chat"


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict))


async def record_request(request: Request, chat: ChatRequest) -> Turn | None:
    """What the request adds to its stored conversation (None without history).

    The request carries the branch the client shows, ending with the user's message.
    The stored conversation is a tree: the sent messages are followed down it as far as
    they match (:meth:`Store.find_continuation`, one read), and the rest starts a new
    branch there, so a regenerate or an edit-and-resend adds a version of that turn and
    deletes nothing. The new user messages are added, by the hub, with the answer
    (:meth:`Store.begin_answer`). A new conversation needs no database round trip here:
    its id is chosen now and its rows are written with the answer's.
    """
    store = request.app.state.store
    if store is None:
        return None
    owner = owner_of(request)
    said = [(m["role"], _text(m["content"])) for m in chat.messages
            if m["role"] in ("user", "assistant")]
    title = _title(chat.messages)
    if chat.conversation_id is None:
        return Turn(new_sortable_id(), True, title, [c for role, c in said if role == "user"])
    try:
        parent, matched = await store.find_continuation(owner, chat.conversation_id, said)
    except TokenRelayError:
        raise
    except Exception as exc:
        log.warning("storing the request failed: %s", type(exc).__name__)
        raise ServiceUnavailable("the database is unavailable; try again shortly") from None
    new = [c for role, c in said[matched:] if role == "user"]
    return Turn(chat.conversation_id, False, title, new, parent)


async def chat(request: Request) -> Response | SubscriberResponse:
    state = request.app.state
    settings = state.settings
    hub: Hub = state.hub
    record = _history_wanted(request)
    data = await read_json_body(request, settings.limits)
    chat_request = validate_chat(data, settings, extra_fields=_EXTRA_FIELDS)
    stream_id = new_id()
    owner = owner_of(request)
    # Admission before any side effect, so a refused request leaves no trace.
    lease = await state.limiter.acquire(owner)
    try:
        key = header(request, b"idempotency-key")
        if key is not None:
            earlier = await state.idempotency.claim(
                owner, check_key(key), fingerprint(data), stream_id
            )
            if earlier is not None:
                await lease.finish()
                return await _attach_existing(request, hub, earlier)
        message_id = new_sortable_id("m-")
        turn = await record_request(request, chat_request) if record else None
        conversation_id = turn.conversation_id if turn else chat_request.conversation_id
        gen = await hub.start(
            owner=owner,
            route=chat_request.route,
            body=chat_request.upstream_body(),
            conversation_id=conversation_id,
            message_id=message_id,
            record=record,
            turn=turn,
            stream_id=stream_id,
            lease=lease,
        )
    except BaseException:
        await lease.finish()
        raise
    headers = [(b"x-message-id", message_id.encode())]
    if conversation_id and _SAFE_ID.fullmatch(conversation_id):
        # Only id-shaped values reach a header: never user text that could split it.
        headers.append((b"x-conversation-id", conversation_id.encode()))
    return SubscriberResponse(hub, gen.stream_id, 0, headers=headers)


HISTORY_HEADER = b"x-tokenrelay-history"


def _history_wanted(request: Request) -> bool:
    """``X-TokenRelay-History: off`` (sent by ``tokenrelay bench`` and ``chat
    --no-history``): the answer streams as usual but is not stored, so tools leave the
    page's history and ``/api/stats`` alone."""
    value = header(request, HISTORY_HEADER)
    if value is None or value.strip().lower() == "on":
        return True
    if value.strip().lower() == "off":
        return False
    raise BadRequest("X-TokenRelay-History must be 'on' or 'off'", code="invalid_header")


async def _attach_existing(request: Request, hub: Hub, stream_id: str) -> SubscriberResponse:
    """A repeated Idempotency-Key: follow the stream the first request started."""
    owner = owner_of(request)
    # The first request may still be between its claim and the stream's creation.
    for _ in range(50):
        try:
            info = await hub.info(stream_id, owner)
            break
        except StreamNotFound:
            await asyncio.sleep(0.1)
    else:
        info = await hub.info(stream_id, owner)
    headers = [(b"idempotent-replayed", b"true")]
    message_id = info.meta.get("message_id")
    if isinstance(message_id, str):
        headers.append((b"x-message-id", message_id.encode()))
    return SubscriberResponse(hub, stream_id, 0, headers=headers)


async def models(request: Request) -> JSONResponse:
    settings = request.app.state.settings
    items: list[dict[str, Any]] = [
        {
            "id": route.name,
            "simulated": route.simulated,
            "description": route.description
            or ("Built-in simulator (no real model)" if route.simulated else ""),
            "fallbacks": list(route.fallbacks),
        }
        for route in settings.models.values()
        if settings.route(route.name) is not None  # allowed_models
    ]
    body: dict[str, Any] = {}
    if settings.passthrough_provider is not None:
        # Any model name goes to this provider: the page lets the user type one.
        body["any_model"] = settings.allowed_models is None
        provider = settings.providers[settings.passthrough_provider]
        upstream = request.app.state.upstream
        known = {item["id"] for item in items}
        probe = await probe_models(upstream, provider)
        for model in probe.models:
            if model["id"] not in known and settings.route(model["id"]) is not None:
                items.append({"id": model["id"], "simulated": False, "description": "",
                              "fallbacks": []})
                known.add(model["id"])
        if probe.problem is not None:
            log.warning("cannot list the models of provider %r: %s (%s)", provider.name,
                        probe.problem.message, probe.problem.code)
            body["problem"] = {**probe.problem.to_dict(), "provider": provider.name,
                               "url": safe_url(upstream.base_url(provider))}
        if settings.default_model and settings.default_model not in known:
            items.insert(0, {"id": settings.default_model, "simulated": False,
                             "description": "The configured default model",
                             "fallbacks": []})
    default = settings.default_model or (items[0]["id"] if items else None)
    return JSONResponse({"models": items, "default": default, **body})


async def config(request: Request) -> JSONResponse:
    state = request.app.state
    caller = request.scope.get("state") or {}
    body = {
        # A caller the auth proxy signed in needs no key.
        "auth_required": bool(getattr(state, "auth_required", False)) and "user" not in caller,
        "version": __version__,
        "heartbeat_s": state.settings.heartbeat_s,
        "grace_s": state.settings.grace_s,
        "history": state.store is not None,
    }
    if "user" in caller:
        body["user"] = caller["user"]
        body["sign_out_url"] = state.settings.sign_out_url
    if not body["auth_required"]:  # this route is public: with keys, routes show only in /metrics
        # Circuit breaker per route (provider/upstream model): state, failures in a row,
        # seconds until it may be tried again.
        body["breakers"] = await state.upstream.breakers.states()
    return JSONResponse(body)


routes = [
    Route("/api/chat", Endpoint(chat), methods=["POST"]),
    Route("/api/models", models, methods=["GET"]),
    Route("/api/config", config, methods=["GET"]),
]
