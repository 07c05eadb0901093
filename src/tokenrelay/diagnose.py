"""Why an upstream cannot be used, in words a person can act on; the checks of ``doctor``.

One vocabulary of problems (:class:`Problem`: a code, a sentence naming the URL tried,
and a hint saying what to do) serves three places: ``GET /api/models`` (the page's
banner when the model list cannot be fetched), the start-up line per provider, and
``tokenrelay doctor``. Every request goes through the gateway's own upstream client
(:class:`~tokenrelay.upstream.UpstreamClient` and its connection pool), so what the doctor
sees is what a chat request would see: same TLS settings, same proxies, same headers.

Codes: ``bad_url``, ``dns_failed``, ``connect_refused``, ``connect_timeout``,
``unreachable``, ``proxy_failed``, ``tls_untrusted``, ``tls_failed``, ``timeout``,
``disconnected``, ``not_http``, ``unauthorized``, ``not_found``, ``redirect``,
``rate_limited``, ``http_error`` (another status),
``html_page``, ``not_json``, ``no_model`` and, for the completion, the gateway's own
upstream error codes (``upstream_incomplete``, ...). Messages and hints never contain a
key: URLs are shown without user info or query, and everything passes :func:`redact`.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import orjson

from tokenrelay.config import ModelRoute, Provider, Settings
from tokenrelay.errors import UpstreamError, UpstreamStatusError, redact
from tokenrelay.events import Event, Finish, ReasoningDelta, TextDelta, ToolCallDelta, Usage
from tokenrelay.httpclient import BadResponse, ConnectFailed, Disconnected, HTTPError, Origin
from tokenrelay.upstream import UpstreamClient

MODELS_TIMEOUT_S = 8.0  # a page load waits for the model list at most this long
_BODY_LIMIT = 4 << 20
_TITLE = re.compile(rb"<title[^>]*>(.*?)</title>", re.I | re.S)
PROMPT = "Say hello in five words."


@dataclass(frozen=True, slots=True)
class Problem:
    """What went wrong (``code``), where (``message``, naming the URL) and what to do."""

    code: str
    message: str
    hint: str

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message, "hint": self.hint}


@dataclass(slots=True)
class ModelsProbe:
    """The outcome of ``GET {base_url}/models``."""

    models: list[dict[str, Any]] = field(default_factory=list)
    problem: Problem | None = None
    stage: str = "models"  # where it failed: resolve, connect, tls or models
    tls: str = ""  # e.g. "TLSv1.3" once a TLS connection was made
    elapsed_s: float = 0.0


def safe_url(url: str) -> str:
    """``url`` without user info, query or fragment: what may be shown to anyone."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(an invalid URL)"
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}{port}{parts.path}" if parts.scheme else "(an invalid URL)"


def url_setting(provider: Provider) -> str:
    """Where the user changes this provider's URL."""
    if provider.name == "upstream":
        return "TOKENRELAY_UPSTREAM_URL"
    if provider.name == "url":
        return "--url"
    return f"providers.{provider.name}.base_url in the config file"


def key_setting(provider: Provider) -> str:
    if provider.name == "upstream":
        return "TOKENRELAY_UPSTREAM_API_KEY"
    if provider.name == "url":
        return "the variable named by --api-key-env"
    return f"the variable named by providers.{provider.name}.api_key_env"


def _connect_problem(text: str, where: str, origin: Origin | None,
                     provider: Provider) -> tuple[str, Problem]:
    """(stage, problem) for a connection failure, from the client's own error text."""
    low = text.lower()
    var = url_setting(provider)
    at = f"{origin.host}:{origin.port}" if origin else "the upstream"
    if "proxy" in low:
        return "connect", Problem("proxy_failed", f"{where}: {text}",
                                  "Check the proxy (HTTPS_PROXY / HTTP_PROXY / NO_PROXY, or "
                                  "the provider's proxy setting): address, port, credentials.")
    if "not trusted" in low or "certificate" in low:
        return "tls", Problem(
            "tls_untrusted", f"{where}: {text}",
            "The server's certificate is not trusted here: point SSL_CERT_FILE at its CA "
            "certificate (PEM), or give the server a certificate from a public CA.")
    if "tls" in low or "ssl" in low:
        return "tls", Problem(
            "tls_failed", f"{where}: {text}",
            f"The TLS handshake failed: if the server speaks plain HTTP, use http:// in {var}.")
    if "refused" in low:
        return "connect", Problem(
            "connect_refused", f"{where}: connection refused by {at}",
            f"Nothing listens there: start the model server, or fix the host and port in {var}.")
    if "within" in low or "timed out" in low:
        return "connect", Problem(
            "connect_timeout", f"{where}: {text}",
            f"No answer from {at}: check the address in {var}, a firewall, or whether "
            "this network needs a proxy (HTTPS_PROXY).")
    if any(s in low for s in ("name or service", "name resolution", "nodename", "no address",
                              "gaierror")):
        return "resolve", Problem(
            "dns_failed", f"{where}: the host name {origin.host if origin else ''} "
            "does not resolve", f"Check the host name in {var} (or set HTTPS_PROXY if only "
            "a proxy can reach it).")
    return "connect", Problem("unreachable", f"{where}: {text}",
                              f"Check the address in {var} and that the server is running.")


def _line(text: str, limit: int = 240) -> str:
    """One line of at most ``limit`` characters (an upstream's error may be a whole page)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _body_summary(body: bytes, content_type: str) -> tuple[bool, str]:
    """(is it an HTML page, a short description of the body)."""
    head = body.lstrip()[:1024].lower()
    html = "html" in content_type.lower() or head.startswith((b"<!doctype html", b"<html"))
    if not html:
        return False, ""
    found = _TITLE.search(body[:65536])
    title = " ".join(found.group(1).decode("utf-8", "replace").split())[:120] if found else ""
    return True, f'an HTML page ("{title}")' if title else "an HTML page"


def _status_problem(status: int, body: bytes, content_type: str, where: str,
                    provider: Provider, base_url: str, location: str = "") -> Problem:
    html, what = _body_summary(body, content_type)
    var = url_setting(provider)
    answer = f"HTTP {status}" + (f", {what}" if html else "")
    if status in (401, 403):
        return Problem("unauthorized", f"{where}: HTTP {status} (the API key was refused)",
                       f"Set a valid key in {key_setting(provider)}.")
    no_v1 = not urlsplit(base_url).path.rstrip("/").endswith("/v1")
    if status == 404 and html and no_v1:
        return Problem("html_page", f"{where}: {answer}",
                       f"This looks like a web server, not an OpenAI-compatible API: check "
                       f"{var} (it usually ends in /v1).")
    if status in (404, 405):
        if no_v1:
            hint = f"OpenAI-compatible APIs live under /v1: try {safe_url(base_url)}/v1 in {var}."
        elif html:
            hint = ("This server answers with a web page, not a model list: if it is an "
                    "OpenAI-compatible API that cannot list models, type a model name in the "
                    f"page or set TOKENRELAY_DEFAULT_MODEL; otherwise check {var}.")
        else:
            hint = ("This server does not list its models: type a model name in the page, or "
                    "set TOKENRELAY_DEFAULT_MODEL.")
        return Problem("html_page" if html else "not_found", f"{where}: {answer}", hint)
    if 300 <= status < 400:
        target = f" to {safe_url(location)}" if location else ""
        return Problem("redirect", f"{where}: HTTP {status} (a redirect{target})",
                       f"tokenrelay does not follow redirects: put the address it redirects "
                       f"to in {var}.")
    if status == 501:
        return Problem("http_error", f"{where}: {answer}",
                       f"This server does not implement the OpenAI API: check {var}.")
    if status == 429:
        return Problem("rate_limited", f"{where}: {answer}",
                       "The upstream is rate limiting this key: wait, or raise the key's limits.")
    return Problem("http_error", f"{where}: {answer}",
                   "The upstream failed: try again later, or look at the server's logs."
                   if status >= 500 else f"Check {var} and the key.")


async def probe_models(client: UpstreamClient, provider: Provider,
                       timeout: float = MODELS_TIMEOUT_S) -> ModelsProbe:
    """``GET /models`` through the gateway's client; never raises for upstream trouble."""
    base = client.base_url(provider)
    where = f"GET {safe_url(base)}/models"
    started = time.monotonic()
    probe = ModelsProbe()
    try:
        probe.problem = await _fetch_models(client, provider, probe, where, timeout)
    finally:
        probe.elapsed_s = time.monotonic() - started
    if probe.problem is not None:
        p = probe.problem
        probe.problem = Problem(p.code, client.redact(p.message), client.redact(p.hint))
    return probe


async def _fetch_models(client: UpstreamClient, provider: Provider, probe: ModelsProbe,
                        where: str, timeout: float) -> Problem | None:
    base = client.base_url(provider)
    var = url_setting(provider)
    target = client._target(provider, "GET", "/models", "application/json", {})
    if target.origin is None:
        probe.stage = "resolve"
        return Problem("bad_url", f"{var} is not a usable URL ({safe_url(base)})",
                       f"Set {var} to an http(s) URL such as http://127.0.0.1:8080/v1.")
    try:
        async with asyncio.timeout(timeout):
            resp = await client._send(target, b"", min(provider.timeouts.connect, timeout))
            try:
                ssl_object = resp.transport.get_extra_info("ssl_object") if resp.transport else None
                probe.tls = ssl_object.version() if ssl_object is not None else ""
                body = await resp.read_all(_BODY_LIMIT)
                status, content_type = resp.status, resp.headers.get("content-type", "")
                location = resp.headers.get("location", "")  # kept once redirects are named
            finally:
                resp.close()
    except TimeoutError:
        probe.stage = "models"
        return Problem("timeout", f"{where}: no answer within {timeout:g} s",
                       f"The server took the connection but did not answer: is {var} the "
                       "right port, or is the server overloaded?")
    except ConnectFailed as exc:
        probe.stage, problem = _connect_problem(str(exc), where, target.origin, provider)
        return problem
    except UpstreamError as exc:
        probe.stage, problem = _connect_problem(exc.message, where, target.origin, provider)
        return problem
    except Disconnected as exc:
        return Problem("disconnected", f"{where}: {exc}",
                       f"The server closed the connection: is {var} an HTTP(S) API?")
    except (BadResponse, HTTPError, OSError) as exc:
        return Problem("not_http", f"{where}: {exc}",
                       f"This is not an HTTP server answering: check {var}.")
    if status != 200:
        return _status_problem(status, body, content_type, where, provider, base, location)
    html, what = _body_summary(body, content_type)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        data = None
    items = data.get("data") if isinstance(data, dict) else None
    if not isinstance(items, list):
        return Problem("html_page" if html else "not_json",
                       f"{where}: {what or 'an answer that is not a JSON model list'}",
                       f"This is not an OpenAI-compatible API: check {var} "
                       "(it usually ends in /v1).")
    probe.models = [m for m in items if isinstance(m, dict) and isinstance(m.get("id"), str)]
    return None


def describe_probe(provider: Provider, url: str, probe: ModelsProbe) -> str:
    """The start-up line for one provider."""
    if probe.problem is None:
        names = ", ".join(m["id"] for m in probe.models[:3])
        more = ", ..." if len(probe.models) > 3 else ""
        return (f"provider {provider.name!r} ({url}): reachable, {len(probe.models)} models"
                + (f" ({names}{more})" if names else ""))
    return (f"provider {provider.name!r} ({url}): NOT usable: {probe.problem.message}. "
            f"{probe.problem.hint}")


# ------------------------------------------------------------------------- the doctor


@dataclass(slots=True)
class Row:
    """One line of the doctor's table."""

    check: str
    status: str  # ok | fail | warn | skip
    detail: str


@dataclass(slots=True)
class Report:
    """Every check of one provider, and the problems to act on."""

    provider: str
    url: str
    rows: list[Row] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(row.status == "fail" for row in self.rows)


async def _resolve(host: str, port: int) -> tuple[list[str], str]:
    """(addresses, error text) for ``host`` as this machine resolves it."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(5):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError) as exc:
        return [], getattr(exc, "strerror", None) or type(exc).__name__
    return sorted({str(info[4][0]) for info in infos}), ""


def _pick_model(settings: Settings, provider: Provider, listed: list[dict[str, Any]],
                wanted: str | None) -> ModelRoute | None:
    if wanted:
        route = settings.models.get(wanted)
        if route is not None and route.provider == provider.name:
            return route
        return ModelRoute(wanted, provider.name, wanted)
    default = settings.default_model
    if default:
        route = settings.route(default)
        if route is not None and route.provider == provider.name:
            return route
    for route in settings.models.values():
        if route.provider == provider.name:
            return route
    if listed:
        name = listed[0]["id"]
        return ModelRoute(name, provider.name, name)
    return None


async def _completion(client: UpstreamClient, route: ModelRoute, where: str,
                      report: Report) -> None:
    started = time.monotonic()
    first: float | None = None
    usage: Usage | None = None
    finish: str | None = None
    text: list[str] = []

    async def sink(events: list[Event]) -> None:
        nonlocal first, usage, finish
        for event in events:
            if isinstance(event, TextDelta | ReasoningDelta | ToolCallDelta) and first is None:
                first = time.monotonic()
            if isinstance(event, TextDelta):
                text.append(event.text)
            elif isinstance(event, Usage):
                usage = event
            elif isinstance(event, Finish):
                finish = event.reason

    call = client.call(route, {"messages": [{"role": "user", "content": PROMPT}],
                               "max_tokens": 16})
    try:
        await call.run(sink)
    except UpstreamError as exc:
        report.rows.append(Row("completion", "fail", _line(f"{route.name}: {exc.message}")))
        report.problems.append(_completion_problem(exc, where, client, route))
        return
    end = time.monotonic()
    ttft = (first or end) - started
    tokens = usage.completion_tokens if usage else call.content_chunks
    rate = tokens / (end - first) if first is not None and end > first else 0.0
    parts = [f"model {route.name}", f"TTFT {ttft * 1000:.0f} ms",
             f"{rate:.0f} tokens/s" if rate else f"{tokens} tokens",
             "[DONE] yes", f"usage {'yes' if usage else 'no'}",
             f"finish_reason {finish or 'missing'}"]
    status = "ok" if usage and finish else "warn"
    report.rows.append(Row("completion", status, ", ".join(parts)))
    if status == "warn":
        missing = " and ".join(n for n, v in (("usage", usage), ("finish_reason", finish))
                               if not v)
        report.problems.append(Problem(
            "incomplete_metadata", f"{where}: the stream sent no {missing}",
            "Answers work; token counts and the finish reason will be estimated."))


def _completion_problem(exc: UpstreamError, where: str, client: UpstreamClient,
                        route: ModelRoute) -> Problem:
    provider = client.provider(route)
    base = client.base_url(provider)
    message = _line(client.redact(f"{where} (model {route.name}): {exc.message}"))
    if isinstance(exc, UpstreamStatusError):
        status = exc.upstream_status
        if status == 404 and "model" in exc.message.lower():
            return Problem("model_not_found", message,
                           f"The upstream has no model {route.name!r}: pass --model with one "
                           "it lists, or set TOKENRELAY_DEFAULT_MODEL.")
        found = _status_problem(status, b"", "", where, provider, base)
        return Problem(found.code, message, found.hint)
    if exc.code == "upstream_unavailable":
        _, found = _connect_problem(exc.message, where, None, provider)
        return Problem(found.code, message, found.hint)
    if exc.code == "upstream_incomplete":
        return Problem(exc.code, message, "The stream ended before [DONE]: a proxy in between "
                       "may cut long responses, or the server does not stream.")
    return Problem(exc.code, message, "See the message; try again with --model NAME.")


async def check_provider(client: UpstreamClient, provider: Provider,
                         model: str | None = None, timeout: float = 15.0) -> Report:
    """Resolve, connect, TLS, ``/models`` and one tiny streamed completion."""
    base = client.base_url(provider)
    report = Report(provider.name, safe_url(base))
    try:
        origin = Origin.parse(base)
    except ValueError:
        var = url_setting(provider)
        report.rows.append(Row("resolve", "fail", "not an http(s) URL"))
        report.problems.append(Problem("bad_url", f"{var} is not a usable URL",
                                       f"Set {var} to an http(s) URL such as "
                                       "http://127.0.0.1:8080/v1."))
        return report
    addresses, error = await _resolve(origin.host, origin.port)
    probe = await probe_models(client, provider, timeout)
    problem, stage = probe.problem, probe.stage
    if addresses:
        report.rows.append(Row("resolve", "ok", f"{origin.host} -> {', '.join(addresses[:3])}"))
    elif problem is None or stage != "resolve":
        report.rows.append(Row("resolve", "warn", f"{origin.host}: {error} here (reached "
                               "through a proxy)"))
    else:
        report.rows.append(Row("resolve", "fail", f"{origin.host}: {error}"))
    order = ["resolve", "connect", "tls", "models"]
    reached = order.index(stage) if problem is not None else len(order)
    if reached == 0 and report.rows[0].status != "fail":
        report.rows[0] = Row("resolve", "fail", problem.message if problem else "")
    at = f"{origin.host}:{origin.port}"
    if reached > 1:
        report.rows.append(Row("connect", "ok", at))
    else:
        report.rows.append(Row("connect", "fail" if reached == 1 else "skip",
                               problem.message if reached == 1 and problem else "not tried"))
    if origin.scheme != "https":
        report.rows.append(Row("tls", "skip", "plain http"))
    elif reached > 2:
        report.rows.append(Row("tls", "ok", f"certificate verified, {probe.tls or 'TLS'}"))
    else:
        report.rows.append(Row("tls", "fail" if reached == 2 else "skip",
                               problem.message if reached == 2 and problem else "not tried"))
    if problem is not None and reached < 3:
        report.rows.append(Row("models", "skip", "not tried"))
        report.rows.append(Row("completion", "skip", "not tried"))
        report.problems.append(problem)
        return report
    if problem is None:
        names = ", ".join(m["id"] for m in probe.models[:4])
        more = ", ..." if len(probe.models) > 4 else ""
        report.rows.append(Row("models", "ok", f"{len(probe.models)} models ({names}{more})"))
    else:
        report.rows.append(Row("models", "fail", problem.message))
    route = _pick_model(client.settings, provider, probe.models, model)
    if route is None:
        report.rows.append(Row("completion", "fail", "no model to try"))
        if problem is not None:
            report.problems.append(problem)
        report.problems.append(Problem("no_model", f"{report.url}: no model to try the "
                                       "completion with", "Pass --model NAME (a model the "
                                       "upstream serves), or set TOKENRELAY_DEFAULT_MODEL."))
        return report
    await _completion(client, route, f"POST {report.url}/chat/completions", report)
    if problem is not None:
        completion_ok = report.rows[-1].status != "fail"
        if completion_ok:  # chat works: a missing list is a nuisance, not a failure
            report.rows[-2].status = "warn"
        report.problems.insert(0, problem)
    return report


def doctor_settings(settings: Settings, providers: Mapping[str, Provider]) -> Settings:
    """``settings`` with each provider tried once: the doctor reports, it does not retry."""
    once = {name: replace(p, retry=replace(p.retry, max_attempts=1))
            for name, p in providers.items()}
    return replace(settings, providers=once)


_MARK = {"ok": "ok", "fail": "FAIL", "warn": "warn", "skip": "-"}


def render(reports: list[Report]) -> str:
    """The doctor's table, then one actionable line per problem."""
    rows = [(r.provider, row.check, _MARK[row.status], row.detail)
            for r in reports for row in r.rows]
    widths = [max([len(h), *(len(row[i]) for row in rows)])
              for i, h in enumerate(("provider", "check", "result"))]
    lines = [f"{'provider':<{widths[0]}}  {'check':<{widths[1]}}  {'result':<{widths[2]}}  detail"]
    for name, check, mark, detail in rows:
        lines.append(f"{name:<{widths[0]}}  {check:<{widths[1]}}  {mark:<{widths[2]}}  {detail}")
    problems = [(r.provider, p) for r in reports for p in r.problems]
    if problems:
        lines.append("")
    for name, p in problems:
        lines.append(f"{name}: {p.message}\n  -> {p.hint}")
    failed = [r.provider for r in reports if r.failed]
    lines.append("")
    count = len(reports)
    if failed:
        lines.append(f"{len(failed)} of {count} provider{'s' * (count > 1)} failing: "
                     + ", ".join(failed))
    else:
        lines.append("the provider is usable" if count == 1 else f"all {count} providers usable")
    return redact("\n".join(lines))
