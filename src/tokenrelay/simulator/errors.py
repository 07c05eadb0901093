"""The simulator's refusals: OpenAI's error body, raised as an exception while a request
is read and answered by the app with its status (400, 401, 404, 405, 413, 429)."""

from __future__ import annotations

from collections.abc import Sequence

import orjson

__all__ = ["HTTPError"]


def _error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": type_, "param": param,
                                   "code": code}})


class HTTPError(Exception):
    """An OpenAI-style error answer, raised inside request handling."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error",
        code: str | None = None, param: str | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = _error_body(message, type_, code, param)
        self.headers = list(headers)
