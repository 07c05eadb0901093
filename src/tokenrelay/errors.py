"""The exception tree of tokenrelay, translated once at each boundary.

```
TokenRelayError (.code, .status, .retryable, .param)
  ConfigError
  BadRequest (.status 400/404/413/422)          -> 4xx JSON error
  UpstreamError (.retryable, .retry_after)       -> retry, fallback or final `error` event
    UpstreamConnectError                          connect refused / reset before a response
    UpstreamTimeout (.phase)                      connect, first_token, idle or total budget spent
    UpstreamStatusError (.status, .param)         non-2xx answer (429, 5xx, 4xx)
      ContextTooLong                              a 400 meaning "context too long"
    UpstreamProtocolError                         a corrupt or malformed chunk
    UpstreamIncomplete                            the stream ended without [DONE]
    UpstreamUnavailable (.retry_after)            -> 503: every route's breaker is open
  StreamError
    StreamNotFound                                -> 404 (unknown, expired or not yours)
    StreamClosed                                  -> 409
    JournalFull                                   a per-stream or global journal bound was hit
  ServiceUnavailable                              -> 503 (Redis/database down, draining)
  RateLimited (.retry_after)                      -> 429 with Retry-After
```

Every error carries a machine-readable ``code`` (documented in the README) and whether
retrying the same request can help. Under ``/v1`` the same errors take OpenAI's shape
(:func:`openai_error`: ``type`` from the status, ``param`` the field at fault).

Messages never contain upstream API keys: the upstream module builds them from status
codes and the provider's own error text, and :func:`redact` scrubs anything that looks
like a bearer token.
"""

from __future__ import annotations

import re

_SECRETISH = re.compile(r"(?i)(bearer\s+|sk-|key[=:]\s*)[A-Za-z0-9_\-\.]{6,}")


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """Remove known secrets and anything shaped like an API key from ``text``."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return _SECRETISH.sub(lambda m: m.group(1) + "[redacted]", text)


class TokenRelayError(Exception):
    """Base of every error tokenrelay raises on purpose."""

    code = "internal_error"
    status = 500
    retryable = False
    param: str | None = None  # the request field at fault, where known (OpenAI's ``param``)

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)
        self.message = message or (self.__class__.__doc__ or self.code).strip()
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, "retryable": self.retryable}


class ConfigError(TokenRelayError):
    """The configuration is invalid."""

    code = "config_error"


class BadRequest(TokenRelayError):
    """The request is invalid."""

    code = "invalid_request"
    status = 400

    def __init__(
        self, message: str, *, code: str | None = None, status: int = 400,
        param: str | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.param = param


class UpstreamError(TokenRelayError):
    """The upstream provider failed."""

    code = "upstream_error"
    status = 502

    def __init__(
        self,
        message: str = "",
        *,
        code: str | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, code=code)
        if retryable is not None:
            self.retryable = retryable
        self.retry_after = retry_after


class UpstreamConnectError(UpstreamError):
    """Could not connect to the upstream."""

    code = "upstream_unavailable"
    retryable = True


class UpstreamTimeout(UpstreamError):
    """The upstream was silent for longer than its time budget."""

    code = "upstream_timeout"
    status = 504
    retryable = True

    def __init__(self, phase: str, seconds: float) -> None:
        super().__init__(f"upstream sent nothing within the {phase} budget of {seconds:g} s")
        self.phase = phase


class UpstreamStatusError(UpstreamError):
    """The upstream answered with an error status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        retry_after: float | None = None,
        overloaded: bool = False,
        param: str | None = None,
    ) -> None:
        # 501 Not Implemented is an answer, not an outage: the same request fails again.
        retryable = status in (408, 409, 425, 429) or (status >= 500 and status != 501)
        code = "upstream_rate_limited" if status == 429 else (
            "upstream_error" if status >= 500 else "upstream_rejected"
        )
        super().__init__(message, code=code, retryable=retryable, retry_after=retry_after)
        self.upstream_status = status
        self.overloaded = overloaded or status in (429, 503, 529)
        self.param = param  # the provider's own ``param``, relayed on /v1


class UpstreamProtocolError(UpstreamError):
    """The upstream sent something that is not a valid chat completion stream."""

    code = "upstream_error"


class UpstreamIncomplete(UpstreamError):
    """The upstream stream ended before [DONE]."""

    code = "upstream_incomplete"
    retryable = True


class StreamError(TokenRelayError):
    """A stream-level error."""

    code = "stream_error"
    status = 409


class StreamNotFound(StreamError):
    """No such stream (unknown, expired, or not yours)."""

    code = "stream_not_found"
    status = 404


class StreamClosed(StreamError):
    """The stream has already finished."""

    code = "stream_closed"
    status = 409


class JournalFull(StreamError):
    """A journal bound (events or bytes per stream, or number of streams) was hit."""

    code = "journal_full"
    status = 503
    retryable = True


class ServiceUnavailable(TokenRelayError):
    """A backing service is unavailable."""

    code = "service_unavailable"
    status = 503
    retryable = True


class RateLimited(TokenRelayError):
    """A rate or concurrency limit was exceeded."""

    code = "rate_limited"
    status = 429
    retryable = True

    def __init__(self, message: str, *, retry_after: float, limit: str) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.limit = limit

    def to_dict(self) -> dict[str, object]:
        return {**super().to_dict(), "limit": self.limit, "retry_after": self.retry_after}


class UpstreamUnavailable(UpstreamError):
    """Every route of the model is skipped by its circuit breaker (issue 15)."""

    code = "upstream_unavailable"
    status = 503
    retryable = True

    def to_dict(self) -> dict[str, object]:
        return {**super().to_dict(), "retry_after": self.retry_after}


class ContextTooLong(UpstreamStatusError):
    """The upstream refused the request as longer than the model's context window."""

    code = "context_length_exceeded"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message)
        self.code = "context_length_exceeded"
        self.retryable = False  # never resent unchanged to the same model


# -- OpenAI's error shape, for every answer under /v1 ------------------------------------

OPENAI_PREFIX = "/v1"
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}


def is_openai_path(path: str) -> bool:
    """Whether a request path is part of the OpenAI API (its errors take OpenAI's shape)."""
    return path == OPENAI_PREFIX or path.startswith(OPENAI_PREFIX + "/")


def openai_error_type(status: int) -> str:
    """OpenAI's ``error.type`` for an HTTP status."""
    found = _OPENAI_TYPES.get(status)
    if found is not None:
        return found
    return "server_error" if status >= 500 else "invalid_request_error"


def openai_error_body(
    message: str, code: str, status: int, param: str | None = None
) -> dict[str, dict[str, object]]:
    """``{"error": {"message", "type", "param", "code"}}``: tokenrelay's own code stays in
    ``code``, so a client can tell ``rate_limited`` (ours) from ``upstream_rate_limited``."""
    return {"error": {"message": message, "type": openai_error_type(status), "param": param,
                      "code": code}}


def openai_error(
    exc: TokenRelayError, status: int | None = None
) -> dict[str, dict[str, object]]:
    """``exc`` as OpenAI's error body; ``status`` when the answer's differs from ``exc``'s.
    Data an error adds to tokenrelay's shape (a rate limit's ``limit`` and ``retry_after``)
    is kept beside OpenAI's four keys."""
    body = openai_error_body(exc.message, exc.code, status or exc.status, exc.param)
    extra = {k: v for k, v in exc.to_dict().items() if k not in _OURS}
    if extra:
        body["error"].update(extra)
    return body


_OURS = frozenset({"code", "message", "retryable"})
