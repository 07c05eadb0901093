"""Small helpers shared by the route modules."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from tokenrelay.asgi import ASGIApp, Receive, Scope, Send
from tokenrelay.errors import TokenRelayError, is_openai_path, openai_error

LOCAL_OWNER = "local"


def owner_of(request: Request) -> str:
    """The tenant of the caller: set by the auth middleware, else the single local user."""
    # The scope's state dict is what ``request.state`` wraps; reading it directly avoids
    # the two AttributeErrors that ``getattr(request.state, ...)`` raises for the local user.
    state = request.scope.get("state")
    return state.get("owner", LOCAL_OWNER) if state else LOCAL_OWNER


class Endpoint:
    """``func(request) -> response`` as a plain ASGI app, for ``Route(path, Endpoint(func))``.

    Starlette wraps a function endpoint in a second exception-handling layer (a Request,
    closures, two more coroutine frames under the response's task). The one in
    ``ExceptionMiddleware`` already applies the same handlers to the same exceptions
    (nothing but routing sits between the two), so the hot endpoints skip the inner one.
    """

    __slots__ = ("__name__", "func")

    def __init__(self, func: Callable[[Request], Awaitable[ASGIApp]]) -> None:
        self.func = func
        self.__name__ = func.__name__  # the route's name, as for a function endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.func(Request(scope, receive, send))
        await response(scope, receive, send)


def header(request: Request, name: bytes) -> str | None:
    """The first value of a request header (``name`` in lower case), as
    ``request.headers.get`` returns it, without building a Headers object."""
    for key, value in request.scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class JSONResponse(Response):
    """A JSON response encoded with orjson."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(
    exc: TokenRelayError, *, openai: bool = False, status: int | None = None
) -> JSONResponse:
    """``exc`` as a JSON error: tokenrelay's documented shape, or with ``openai`` OpenAI's
    (``errors.openai_error``); ``status`` when the answer's differs from ``exc``'s."""
    status = status or exc.status
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if status in (429, 503) and retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    body = openai_error(exc, status) if openai else {"error": exc.to_dict()}
    return JSONResponse(body, status_code=status, headers=headers)


def speaks_openai(request: Request) -> bool:
    """Whether the request is under ``/v1`` (answers, errors included, in OpenAI's shape)."""
    path: str = request.scope["path"]
    root = request.scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return is_openai_path(path)
