"""Conversation history and model statistics: validate, call the store, respond.

The store comes from ``request.app.state.store``; every call is scoped to the caller's
owner, so another tenant's conversation answers exactly like a missing one (404).
Errors are raised as :class:`~tokenrelay.errors.TokenRelayError` and rendered by the app's
handler as ``{"error": {"code", "message", "retryable"}}``.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tokenrelay.errors import BadRequest
from tokenrelay.routes.common import JSONResponse, owner_of
from tokenrelay.store.base import Store
from tokenrelay.validation import read_json_body

LIST_LIMIT_MAX = 200
TITLE_MAX = 200
QUERY_MAX = 200
MESSAGE_ID_MAX = 100


def _store(request: Request) -> Store:
    store: Store | None = request.app.state.store
    if store is None:
        raise BadRequest("history is disabled (TOKENRELAY_DATABASE_URL=none)",
                         code="history_disabled", status=404)
    return store


def _not_found() -> BadRequest:
    return BadRequest("conversation not found", code="conversation_not_found", status=404)


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if not low <= value <= high:
        raise BadRequest(f"{name} must be an integer between {low} and {high}")
    return value


async def list_conversations(request: Request) -> Response:
    limit = _int_param(request, "limit", 50, 1, LIST_LIMIT_MAX)
    offset = _int_param(request, "offset", 0, 0, 10**9)
    query = request.query_params.get("q", "").strip()
    if len(query) > QUERY_MAX:
        raise BadRequest(f"q (the search) must be at most {QUERY_MAX} characters",
                         code="invalid_query")
    found = await _store(request).list_conversations(owner_of(request), limit, offset, query)
    return JSONResponse({"conversations": found})


async def get_conversation(request: Request) -> Response:
    conversation_id = request.path_params["conversation_id"]
    found = await _store(request).get_conversation(owner_of(request), conversation_id)
    if found is None:
        raise _not_found()
    return JSONResponse(found)


def _title_of(data: object) -> str:
    title = data.get("title") if isinstance(data, dict) else None
    if not isinstance(title, str) or not 1 <= len(title.strip()) <= TITLE_MAX:
        raise BadRequest(f"title must be a string of 1 to {TITLE_MAX} characters")
    return title.strip()


def _message_id_of(data: dict[str, object]) -> str:
    value = data["active_message_id"]
    if not isinstance(value, str) or not 1 <= len(value) <= MESSAGE_ID_MAX:
        raise BadRequest(
            f"active_message_id must be a message id (a string of 1 to {MESSAGE_ID_MAX} "
            "characters)"
        )
    return value


async def patch_conversation(request: Request) -> Response:
    """``{"title": ...}`` renames (answers the summary); ``{"active_message_id": ...}``
    shows the branch through that message, i.e. switches a turn's version (answers the
    conversation as GET does). Both are checked before either is applied."""
    conversation_id = request.path_params["conversation_id"]
    data = await read_json_body(request, request.app.state.settings.limits)
    switch = isinstance(data, dict) and "active_message_id" in data
    message_id = _message_id_of(data) if switch else None
    title = _title_of(data) if not switch or "title" in data else None
    store, owner = _store(request), owner_of(request)
    if message_id is not None:
        switched = await store.set_active(owner, conversation_id, message_id)
        if switched is None:
            raise _not_found()
        if not switched:
            raise BadRequest("message not found in this conversation",
                             code="message_not_found", status=404)
    if title is not None and not await store.rename_conversation(owner, conversation_id, title):
        raise _not_found()
    found = await store.get_conversation(owner, conversation_id)
    if found is None:  # deleted between the two calls
        raise _not_found()
    if message_id is None:
        found.pop("messages")
    return JSONResponse(found)


async def delete_conversation(request: Request) -> Response:
    conversation_id = request.path_params["conversation_id"]
    if not await _store(request).delete_conversation(owner_of(request), conversation_id):
        raise _not_found()
    return Response(status_code=204)


async def stats(request: Request) -> Response:
    """The caller's own answers; every tenant's for an admin key (``admin_keys``)."""
    state = request.scope.get("state") or {}
    owner = None if state.get("admin") else owner_of(request)
    return JSONResponse({"models": await _store(request).model_stats(owner)})


routes: list[BaseRoute] = [
    Route("/api/conversations", list_conversations, methods=["GET"]),
    Route("/api/conversations/{conversation_id}", get_conversation, methods=["GET"]),
    Route("/api/conversations/{conversation_id}", patch_conversation, methods=["PATCH"]),
    Route("/api/conversations/{conversation_id}", delete_conversation, methods=["DELETE"]),
    Route("/api/stats", stats, methods=["GET"]),
]
