"""Refusing what a browser does for another site, before any work (pure ASGI).

A local gateway with no client keys spends the user's paid upstream key for whoever
reaches ``127.0.0.1``, and every web page the user visits can. Three checks close that:

* **Host** (DNS rebinding): a page on ``evil.example`` that rebinds its name to
  ``127.0.0.1`` is same-origin with us under *its* name, so it could read answers and
  history. Only this gateway's names are served: the loopback names when the connection
  arrived on a loopback address, the address it arrived on, and ``allowed_hosts``
  (``*``: any). Anything else is ``421``. ``/healthz`` is exempt (load balancers probe by
  address; it tells nothing).
* **Origin / Sec-Fetch-Site** (on ``/api``, ``/v1`` and ``/metrics``): a request carrying
  an ``Origin`` other than the page's own (scheme aside: TLS may end at a proxy) or one
  of ``cors_origins`` is ``403``; so is ``Sec-Fetch-Site: cross-site`` without an allowed
  ``Origin``. SDKs and curl send neither and are unaffected.
* **Content-Type** (on ``/api`` and ``/v1``): a POST, PUT or PATCH with a body must say
  ``application/json`` (``415``). ``text/plain`` and form bodies need no CORS preflight,
  so without this a page's ``<form>`` or ``fetch(..., {mode: "no-cors"})`` could start a
  generation. Bodiless requests (cancel) need no content type.

It sits inside :class:`~tokenrelay.middleware.AccessLogMiddleware` (refusals get a request
id and a log line) and outside CORS and auth, so a refusal costs no key lookup.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence

from tokenrelay.asgi import ASGIApp, Receive, Scope, Send
from tokenrelay.middleware import PROTECTED, _json_error, route_path

__all__ = ["GuardMiddleware", "HostPolicy"]

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_DEFAULT_PORTS = {"http": "80", "https": "443"}
_CROSS_CHECKED = (*PROTECTED, "/metrics")


def _split(host: str) -> tuple[str, str]:
    """``name:port`` → (name, port); IPv6 literals keep their brackets."""
    if host.startswith("["):
        name, _, rest = host.partition("]")
        return name + "]", rest[1:] if rest.startswith(":") else ""
    name, _, port = host.partition(":")
    return name, port


@functools.lru_cache(maxsize=256)  # per request otherwise; the local addresses are few
def _is_loopback(address: str) -> bool:
    try:
        return _ip(address).is_loopback
    except ValueError:
        return address == "localhost"


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address, with ``::ffff:127.0.0.1`` (IPv4 on a dual-stack socket) as IPv4."""
    ip = ipaddress.ip_address(text.strip("[]"))
    return getattr(ip, "ipv4_mapped", None) or ip


class HostPolicy:
    """Which ``Host`` values this gateway answers to (see the module docstring)."""

    def __init__(self, allowed: Sequence[str], bind_host: str) -> None:
        self.any = "*" in allowed
        self.names = {h for h in allowed if not _split(h)[1]}  # any port
        self.exact = {h for h in allowed if _split(h)[1]}  # name:port
        self.bind_host = bind_host  # when the server does not say where a request arrived

    def allows(self, host: str, server: tuple[str, int | None] | None) -> bool:
        if self.any:
            return True
        host = host.lower()
        name, _ = _split(host)
        if not name:
            return False
        if name in self.names or host in self.exact:
            return True
        local = server[0] if server else self.bind_host
        if not local:
            return False
        if _is_loopback(local) and name in LOOPBACK_NAMES:
            return True
        return _same_address(name, local)


@functools.lru_cache(maxsize=256)
def _same_address(name: str, local: str) -> bool:
    """Whether a Host name is an IP literal of the address the request arrived on."""
    try:
        return _ip(name) == _ip(local)
    except ValueError:
        return False


def _own_origin(origin: str, host: str) -> bool:
    """Whether ``Origin`` names the host the request was sent to (the page's own origin)."""
    scheme, sep, netloc = origin.partition("://")
    if not sep or not host:
        return False
    name, port = _split(netloc)
    host_name, host_port = _split(host.lower())
    default = _DEFAULT_PORTS.get(scheme, "")
    return name == host_name and (port or default) == (host_port or default)


def _has_body(headers: dict[bytes, bytes]) -> bool:
    if b"transfer-encoding" in headers:
        return True
    length = headers.get(b"content-length")
    return length is not None and length.strip() not in (b"0", b"")


def _is_json(content_type: str) -> bool:
    return content_type.partition(";")[0].strip().lower() == "application/json"


def _shown(value: str) -> str:
    return value[:100]


class GuardMiddleware:
    """Host, Origin/Sec-Fetch-Site and Content-Type checks (see the module docstring)."""

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str] = (), bind_host: str = "",
                 cors_origins: Sequence[str] = ()) -> None:
        self.app = app
        self.hosts = HostPolicy(allowed_hosts, bind_host)
        self.cors = frozenset(o.lower() for o in cors_origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # One C-level dict build beats a Python loop over the headers (per request).
        headers = dict(scope["headers"])
        raw_host = headers.get(b"host")
        host = raw_host.decode("latin-1") if raw_host is not None else None
        raw_origin = headers.get(b"origin")
        origin = raw_origin.decode("latin-1").lower() if raw_origin is not None else None
        fetch_site = headers.get(b"sec-fetch-site")
        path = route_path(scope)
        refusal = None
        if path != "/healthz" and not self.hosts.allows(host or "", scope.get("server")):
            refusal = (421, "host_not_allowed", (
                f"this gateway does not answer to the host name {_shown(host or '')!r}; "
                "open it as localhost or 127.0.0.1, or add the name to allowed_hosts "
                "(TOKENRELAY_ALLOWED_HOSTS)") if host else (
                "a Host header is required"))
        elif path.startswith(_CROSS_CHECKED):
            refusal = self._cross_site(origin, fetch_site, host or "")
            if refusal is None and scope["method"] in _BODY_METHODS \
                    and path.startswith(PROTECTED) and _has_body(headers):
                raw_type = headers.get(b"content-type")
                content_type = raw_type.decode("latin-1") if raw_type is not None else None
                if not _is_json(content_type or ""):
                    refusal = (415, "unsupported_media_type", (
                        "send the request body as JSON with 'Content-Type: application/json' "
                        f"(got {_shown(content_type)!r})" if content_type else
                        "send the request body as JSON with 'Content-Type: application/json' "
                        "(the request had no Content-Type)"))
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, code, message = refusal
        await _json_error(send, status, code, message, [])

    def _cross_site(self, origin: str | None, fetch_site: bytes | None,
                    host: str) -> tuple[int, str, str] | None:
        if origin is not None:
            if origin in self.cors or _own_origin(origin, host):
                return None
            return (403, "origin_not_allowed", (
                f"requests from web pages on {_shown(origin)!r} are refused; to let a web "
                "app there use this gateway, add its origin to cors_origins "
                "(TOKENRELAY_CORS_ORIGINS)"))
        if fetch_site == b"cross-site":
            return (403, "cross_site_request", (
                "a request a browser made for another site's page (Sec-Fetch-Site: "
                "cross-site) is refused; to let a web app use this gateway, add its origin "
                "to cors_origins (TOKENRELAY_CORS_ORIGINS)"))
        return None
