"""Small helpers shared by the route modules."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from tokenrelay.errors import TokenRelayError

LOCAL_OWNER = "local"


def owner_of(request: Request) -> str:
    """The tenant of the caller: set by the auth middleware, else the single local user."""
    return getattr(request.state, "owner", LOCAL_OWNER)


class JSONResponse(Response):
    """A JSON response encoded with orjson."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def error_response(exc: TokenRelayError) -> JSONResponse:
    headers = {}
    retry_after = getattr(exc, "retry_after", None)
    if exc.status in (429, 503) and retry_after is not None:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    return JSONResponse({"error": exc.to_dict()}, status_code=exc.status, headers=headers)
