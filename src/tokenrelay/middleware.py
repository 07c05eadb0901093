"""Pure ASGI middleware: API-key auth, request ids with an access log, CORS.

Pure ASGI (not ``BaseHTTPMiddleware``) because responses here are long SSE streams: each
class only rewrites the ``http.response.start`` message on its way out and passes every
body message through at once, so nothing is buffered or delayed.

Order, outermost first (``app.create_app``): :class:`AccessLogMiddleware` (request id,
``nosniff``, one log line per request), then CORS (Starlette's, only when origins are
configured, so a preflight never needs a key and a 401 is readable cross-origin), then
:class:`AuthMiddleware` (only when keys are configured: without any it passes everything).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

import orjson

from tokenrelay.asgi import DEFERRED, ASGIApp, Deferred, Message, Receive, Scope, Send
from tokenrelay.config import ApiKey
from tokenrelay.errors import is_openai_path, openai_error_body

log = logging.getLogger("tokenrelay.access")

PROTECTED = ("/api", "/v1")
PUBLIC = frozenset({("GET", "/api/config"), ("HEAD", "/api/config")})  # the page learns auth
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_NOSNIFF = (b"x-content-type-options", b"nosniff")
MAX_HEADER_BYTES = 64 * 1024  # all request headers together
MAX_HEADERS = 100  # request header lines (Settings.max_headers)


def route_path(scope: Scope) -> str:
    """The path routing sees (``root_path`` removed), as Starlette matches it."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root):] or "/"
    return path


def _log_path(path: str, limit: int = 200) -> str:
    """The path as one log field: percent-encoded, so no space, line break or control
    character in a (decoded) path can split or forge a log line."""
    return quote(path[:limit], safe="/:@!$&'()*+,;=-._~")


def _log_method(method: str) -> str:
    return method[:16] if method.isascii() and method.isalpha() else "?"


class AuthMiddleware:
    """Bearer API keys and a trusted auth proxy's user header on ``/api/*`` and ``/v1/*``.

    On success ``scope["state"]["owner"]`` is the tenant id, ``key_name`` its name for
    the access log (never the key), ``admin`` whether it may see every tenant's stats, and
    ``user`` the proxy's user name. Every configured key is compared, in constant time,
    against a digest of the presented one, so neither timing nor length tells which key
    was close.

    ``trusted_header`` (with ``trusted_proxies``) is believed only from a peer address in
    those networks: there it makes the request the tenant ``user:<value>``, whatever
    ``Authorization`` says (a proxy's basic auth may pass through). From any other
    address it is ignored (logged once), and the request needs a key. ``GET /api/config``
    is answered to anyone, identified when possible (the page learns who it is).
    """

    def __init__(self, app: ASGIApp, keys: Sequence[ApiKey] = (), *,
                 trusted_header: str | None = None, trusted_proxies: Sequence[str] = (),
                 admin_keys: Sequence[str] = ()) -> None:
        self.app = app
        self._keys = [(hashlib.sha256(k.key.encode()).digest(), k) for k in keys]
        self._admins = frozenset(admin_keys)
        self._header = trusted_header.lower().encode() if trusted_header else None
        self._proxies = [ipaddress.ip_network(p, strict=False) for p in trusted_proxies]
        self._warned = False
        self._header_name = trusted_header or ""

    def _match(self, presented: bytes) -> ApiKey | None:
        digest = hashlib.sha256(presented).digest()
        found = None
        for key_digest, key in self._keys:  # no early exit: the loop takes the same time
            if hmac.compare_digest(digest, key_digest):
                found = key
        return found

    def _trusted(self, scope: Scope) -> bool:
        client = scope.get("client")
        if not client:
            return False
        try:
            address = ipaddress.ip_address(client[0])
        except ValueError:
            return False
        address = getattr(address, "ipv4_mapped", None) or address  # dual-stack socket
        return any(address in network for network in self._proxies)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        if not path.startswith(PROTECTED):
            await self.app(scope, receive, send)
            return
        presented = None
        users = []
        for name, value in scope["headers"]:
            if name == b"authorization" and presented is None:
                scheme, _, token = value.partition(b" ")
                presented = token.strip() if scheme.lower() == b"bearer" else b""
            elif name == self._header:
                users.append(value)
        state = scope.setdefault("state", {})
        if users:
            if self._trusted(scope):
                user = _user_name(users)
                if user is None:
                    await _json_error(send, 400, "invalid_user_header", (
                        f"the auth proxy's {self._header_name} header must be one user name "
                        "of 1-200 printable characters; check the proxy's configuration"), [])
                    return
                state["owner"] = state["key_name"] = "user:" + user
                state["user"] = user
                await self.app(scope, receive, send)
                return
            if not self._warned:
                self._warned = True
                client = scope.get("client") or ("?",)
                log.warning("ignored %s from %s, which is not in trusted_proxies (logged once)",
                            self._header_name, client[0])
        key = self._match(presented) if presented else None
        if key is not None:
            state["owner"] = key.owner
            state["key_name"] = key.name
            if key.name in self._admins:
                state["admin"] = True
        elif (scope.get("method"), path) not in PUBLIC:
            await _unauthorized(scope, send, invalid=bool(presented),
                                proxy=self._header is not None)
            return
        await self.app(scope, receive, send)


def _user_name(values: list[bytes]) -> str | None:
    """The one user a proxy named: printable ASCII (an e-mail address, a login), or None."""
    if len(values) != 1:
        return None  # two values: one may be the client's own, passed through
    value = values[0].strip()
    if not 1 <= len(value) <= 200 or not all(0x21 <= c <= 0x7E for c in value):
        return None
    return value.decode("ascii")


async def _unauthorized(scope: Scope, send: Send, *, invalid: bool, proxy: bool = False) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    message = "invalid API key" if invalid else (
        "an API key is required: send 'Authorization: Bearer <key>'"
        + (", or sign in through the auth proxy" if proxy else "")
    )
    challenge = b'Bearer realm="tokenrelay"' + (b', error="invalid_token"' if invalid else b"")
    await _json_error(send, 401, "unauthorized", message, [(b"www-authenticate", challenge)],
                      openai=is_openai_path(route_path(scope)))


async def _json_error(
    send: Send, status: int, code: str, message: str, headers: list[tuple[bytes, bytes]],
    *, openai: bool = False,
) -> None:
    """An error answered by a middleware: under ``/v1`` in OpenAI's shape, as routes do."""
    body = orjson.dumps(openai_error_body(message, code, status) if openai else
                        {"error": {"code": code, "message": message, "retryable": False}})
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            *headers,
        ],
    })
    await send({"type": "http.response.body", "body": body})


class AccessLogMiddleware:
    """A request id (``X-Request-Id``: the client's if well-formed, else new) echoed on the
    response, ``X-Content-Type-Options: nosniff`` on every response, and one access log
    line when the response ends: method, path (no query string), status, duration, key
    name. Headers are never logged.

    It also refuses oversized request headers with 431: uvicorn's httptools parser has no
    limit of its own, so this keeps them away from the app (a proxy in front should cap
    them before they are buffered at all).
    """

    def __init__(self, app: ASGIApp, max_header_bytes: int = MAX_HEADER_BYTES,
                 max_headers: int = MAX_HEADERS) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes
        # Our protocol refuses too many headers while parsing; this covers other servers.
        self.max_headers = max_headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = None
        header_bytes = 0
        for name, value in scope["headers"]:
            header_bytes += len(name) + len(value) + 4
            if name == b"x-request-id" and request_id is None:
                text = value.decode("latin-1")
                request_id = text if _REQUEST_ID.fullmatch(text) else ""
        request_id = request_id or os.urandom(8).hex()  # secrets.token_hex(8), less Python
        count = len(scope["headers"])
        if header_bytes > self.max_header_bytes or count > self.max_headers:
            log.info("%s %s 431 %d request headers of %d bytes refused rid=%s",
                     _log_method(scope.get("method", "")), _log_path(scope.get("path", "")),
                     count, header_bytes, request_id)
            code, message = ("headers_too_large",
                             f"request headers larger than {self.max_header_bytes} bytes")
            if count > self.max_headers:
                code, message = ("too_many_headers", f"more than {self.max_headers} request "
                                 "headers; send fewer (the limit is max_headers)")
            # No "Connection: close": the server reads and drops an unread body, so the
            # client reads this answer rather than a reset.
            await _json_error(send, 431, code, message,
                              [_NOSNIFF, (b"x-request-id", request_id.encode())],
                              openai=is_openai_path(route_path(scope)))
            return
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        rid = (b"x-request-id", request_id.encode())
        status = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                for name, _ in headers:
                    if name.lower() == b"x-content-type-options":
                        break
                else:
                    headers.append(_NOSNIFF)
                headers.append(rid)
                message = {**message, "headers": headers}
            await send(message)

        def log_line() -> None:
            # The arguments cost (quoting the path) even when the line is filtered out.
            if log.isEnabledFor(logging.INFO):
                log.info(
                    "%s %s %d %.1fms key=%s rid=%s",
                    _log_method(scope.get("method", "")),
                    _log_path(scope.get("path", "")),
                    status,
                    (time.perf_counter() - started) * 1000,
                    state.get("key_name", "-"),
                    request_id,
                    extra={"request_id": request_id, "status": status},
                )

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            status = status or 500
            raise
        finally:
            deferred: Deferred | None = scope.get(DEFERRED)
            if deferred is not None and deferred.body is not None:
                deferred.after.append(log_line)  # a stream: logged when its body ends
            else:
                log_line()


CORS_HEADERS = ["Authorization", "Content-Type", "Last-Event-ID", "Idempotency-Key",
                "X-Request-Id", "X-TokenRelay-History"]
CORS_EXPOSE = ["X-Stream-Id", "X-Message-Id", "X-Conversation-Id", "X-Request-Id",
               "Retry-After", "Idempotent-Replayed"]
CORS_METHODS = ["GET", "POST", "PATCH", "DELETE"]


def cors_options(origins: Sequence[str]) -> dict[str, Any]:
    """Arguments for Starlette's (pure ASGI) CORSMiddleware: listed origins only, bearer
    keys rather than cookies, so no credentials mode."""
    return {
        "allow_origins": list(origins),
        "allow_methods": CORS_METHODS,
        "allow_headers": CORS_HEADERS,
        "expose_headers": CORS_EXPOSE,
        "allow_credentials": False,
        "max_age": 600,
    }
