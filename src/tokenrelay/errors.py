"""The exception tree of tokenrelay, translated once at each boundary.

```
TokenRelayError (.code, .status, .retryable)
  ConfigError
  BadRequest (.status 400/404/413/422)          -> 4xx JSON error
  UpstreamError (.retryable, .retry_after)       -> retry, fallback or final `error` event
    UpstreamConnectError                          connect refused / reset before a response
    UpstreamTimeout (.phase)                      connect, first_token, idle or total budget spent
    UpstreamStatusError (.status)                 non-2xx answer (429, 5xx, 4xx)
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
retrying the same request can help. Messages never contain upstream API keys: the upstream
module builds them from status codes and the provider's own error text, and
:func:`redact` scrubs anything that looks like a bearer token.
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

    def __init__(self, message: str, *, code: str | None = None, status: int = 400) -> None:
        super().__init__(message, code=code)
        self.status = status


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
    ) -> None:
        retryable = status in (408, 409, 425, 429) or status >= 500
        code = "upstream_rate_limited" if status == 429 else (
            "upstream_error" if status >= 500 else "upstream_rejected"
        )
        super().__init__(message, code=code, retryable=retryable, retry_after=retry_after)
        self.upstream_status = status
        self.overloaded = overloaded or status in (429, 503, 529)


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
