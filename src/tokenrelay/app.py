"""create_app(settings): the ASGI application and the lifespan that builds its parts.

The lifespan owns every long-lived object: the upstream HTTP session, the built-in
simulator's server (when no upstream is configured), the journal, the store and the hub.
Handlers reach them through ``request.app.state``; nothing is global.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Match, Mount, Route, Router
from starlette.staticfiles import StaticFiles
from starlette.types import Lifespan

from tokenrelay.asgi import DEFERRED, Deferred, Receive, Scope, Send
from tokenrelay.breaker import open_breakers
from tokenrelay.config import SIMULATOR, Settings, load_settings
from tokenrelay.errors import BadRequest, TokenRelayError, openai_error_body
from tokenrelay.guard import GuardMiddleware
from tokenrelay.httpclient import Pool
from tokenrelay.hub import Hub
from tokenrelay.idempotency import IdempotencyStore, MemoryIdempotency, RedisIdempotency
from tokenrelay.journal import open_journal
from tokenrelay.limits import open_limiter
from tokenrelay.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from tokenrelay.metrics import Metrics, metrics_refusal
from tokenrelay.middleware import AccessLogMiddleware, AuthMiddleware, cors_options
from tokenrelay.routes import chat, conversations, openai, responses, streams
from tokenrelay.routes.common import JSONResponse, error_response, speaks_openai
from tokenrelay.upstream import UpstreamClient

log = logging.getLogger("tokenrelay")

WEB_DIR = Path(__file__).parent / "web"

PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
        "frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


@contextlib.asynccontextmanager
async def _simulator_server(speed: float) -> AsyncIterator[str]:
    """Run the built-in simulator on a loopback port of this event loop; yield its base URL."""
    from tokenrelay.server import running_in_loop
    from tokenrelay.simulator import SimulatorConfig, create_simulator

    simulator = create_simulator(SimulatorConfig(speed=speed))
    async with running_in_loop(
        simulator, lifespan="off", http="httptools", force_exit=True
    ) as url:
        yield url + "/v1"


def _open_store(settings: Settings) -> Any:
    if not settings.database_url or settings.database_url == "none":
        return None
    from tokenrelay.store import open_store

    return open_store(settings.database_url, instance_id=settings.instance_id)


def _open_idempotency(settings: Settings) -> IdempotencyStore:
    retention = settings.journal.retention_s
    if settings.redis_url:
        return RedisIdempotency(settings.redis_url, retention, settings.redis_prefix)
    return MemoryIdempotency(retention)


def _log_proxies(settings: Settings) -> None:
    """One line per provider whose route was decided by a proxy setting (password hidden)."""
    for name, provider in settings.providers.items():
        if provider.proxy:
            log.info("provider %r goes through proxy %s (from %s)",
                     name, provider.proxy_display, provider.proxy_from)
        elif provider.proxy_from:
            log.info("provider %r connects directly (%s)", name, provider.proxy_from)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    async with contextlib.AsyncExitStack() as stack:
        pool = Pool(keepalive_s=30.0)
        stack.push_async_callback(pool.aclose)
        base_urls = {}
        if SIMULATOR in settings.providers:
            base_urls[SIMULATOR] = await stack.enter_async_context(
                _simulator_server(settings.simulator_speed)
            )
            log.info("no upstream configured: serving the built-in simulator (simulated models)")
        breakers = open_breakers(settings)  # circuit breaker per route (issue 15)
        stack.push_async_callback(breakers.aclose)
        upstream = UpstreamClient(settings, pool, base_urls, breakers)
        _log_proxies(settings)
        journal = open_journal(
            settings.journal_url,
            settings.journal,
            instance_id=settings.instance_id,
            prefix=settings.redis_prefix,
            lease_s=settings.lease_s,
        )
        stack.push_async_callback(journal.aclose)
        store = _open_store(settings)
        if store is not None:
            await store.start()
            stack.push_async_callback(store.aclose)
        idempotency = _open_idempotency(settings)
        stack.push_async_callback(idempotency.aclose)
        limiter = open_limiter(settings)
        stack.push_async_callback(limiter.aclose)
        metrics: Metrics = app.state.metrics
        hub = Hub(settings, journal, upstream, store, observer=metrics)
        metrics.bind(hub)
        metrics.bind_breakers(breakers)
        await hub.startup()
        app.state.upstream = upstream
        app.state.journal = journal
        app.state.store = store
        app.state.hub = hub
        app.state.idempotency = idempotency
        app.state.limiter = limiter
        # `tokenrelay serve`: one log line per provider, reachable or why not. In the
        # background: readiness does not wait for a slow upstream.
        probe = (asyncio.get_running_loop().create_task(_announce_providers(upstream))
                 if app.state.announce_providers else None)
        try:
            yield
        finally:
            if probe is not None:
                probe.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await probe
            await hub.shutdown()


async def _announce_providers(upstream: UpstreamClient) -> None:
    """Log one line per provider: reachable (and how many models), or why not."""
    from tokenrelay.diagnose import describe_probe, probe_models, safe_url

    async def one(provider: Any) -> None:
        url = safe_url(upstream.base_url(provider))
        result = await probe_models(upstream, provider, timeout=5.0)
        line = describe_probe(provider, url, result)
        (log.info if result.problem is None else log.warning)("%s", line)

    await asyncio.gather(*(one(p) for p in upstream.settings.providers.values()
                           if upstream.base_url(p)))


async def announce_providers(settings: Settings) -> None:
    """The start-up lines without an app (``serve --workers N`` prints them once)."""
    pool = Pool(keepalive_s=1.0)
    try:
        await _announce_providers(UpstreamClient(settings, pool))
    finally:
        await pool.aclose()


async def _handle_ours(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, TokenRelayError)
    return error_response(exc, openai=speaks_openai(request))


async def _handle_http(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    codes = {404: "not_found", 405: "method_not_allowed"}
    code = codes.get(exc.status_code, "http_error")
    return error_response(BadRequest(str(exc.detail), code=code, status=exc.status_code),
                          openai=speaks_openai(request))


async def _handle_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    body = openai_error_body("internal error", "internal_error", 500) if speaks_openai(
        request) else {"error": {"code": "internal_error", "message": "internal error",
                                 "retryable": True}}
    return JSONResponse(body, status_code=500)


async def index(request: Request) -> Response:
    return FileResponse(WEB_DIR / "index.html", headers=PAGE_HEADERS)


async def metrics_endpoint(request: Request) -> Response:
    refusal = metrics_refusal(request.app.state.settings, request.scope)
    if refusal is not None:
        return error_response(refusal)
    upstream = getattr(request.app.state, "upstream", None)
    if upstream is not None:
        await upstream.breakers.states()  # the breaker gauges show the shared state
    return Response(request.app.state.metrics.render(), media_type=METRICS_CONTENT_TYPE)


async def health(request: Request) -> JSONResponse:
    hub: Hub = request.app.state.hub
    return JSONResponse(
        {"status": "draining" if hub.draining else "ok", "streams": len(hub.generations)}
    )


class _ExactRouter(Router):
    """Starlette's router, plus a dict lookup for paths without parameters.

    Starlette tries every route in order (a regex match each) and then calls
    ``Route.handle``; the chat endpoints sit several routes down the list. A path that
    only its own route can match (checked once, here) goes straight to that route when
    the method matches too; anything else (405s, 404s, parameters, mounts, a
    ``root_path``) takes Starlette's own scan, so the answers are the same.
    """

    def __init__(self, routes: list[BaseRoute], **kwargs: Any) -> None:
        super().__init__(routes, **kwargs)
        self._exact: dict[str, tuple[Route, frozenset[str]]] = {}
        for i, route in enumerate(routes):
            if not isinstance(route, Route) or route.param_convertors or not route.methods:
                continue
            probes = [{"type": "http", "path": route.path, "root_path": "", "method": m}
                      for m in route.methods]
            if route.matches(probes[0])[0] is Match.FULL and not any(
                    earlier.matches(probe)[0] is not Match.NONE
                    for earlier in routes[:i] for probe in probes):
                self._exact.setdefault(route.path, (route, frozenset(route.methods)))

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):  # else: as Starlette
            exact = self._exact.get(scope["path"])
            # What Route.matches answers for its own path (checked in __init__), without
            # its regex match and dicts: FULL when the method is one of the route's.
            if exact is not None and scope["method"] in exact[1]:
                route = exact[0]
                # Then what Router.app and Route.handle would do. Not scope["route"], which
                # nothing here reads: with it the scope outgrows its hash table, which
                # lives as long as the stream.
                if "router" not in scope:
                    scope["router"] = self
                scope["endpoint"] = route.endpoint
                scope["path_params"] = dict(scope.get("path_params", {}))
                await route.app(scope, receive, send)
                return
        await super().app(scope, receive, send)


class _AppState(State):
    """Starlette's ``State``, each entry kept as an instance attribute too.

    ``State`` keeps its entries in a dict that only ``__getattr__`` reads, and Python calls
    that after the ordinary lookup failed (an AttributeError built and dropped): ~1.6k
    instructions a read, and a request reads the app's state a couple of dozen times. With
    the entries in the instance dict the ordinary lookup finds them; both stay in step
    through every way ``State`` offers to set or delete one.
    """

    def __setattr__(self, key: Any, value: Any) -> None:
        super().__setattr__(key, value)
        if key != "_state":
            object.__setattr__(self, key, value)

    def __delattr__(self, key: Any) -> None:
        super().__delattr__(key)
        if key != "_state":
            self.__dict__.pop(key, None)

    def __setitem__(self, key: str, value: Any) -> None:
        self.__setattr__(key, value)

    def __delitem__(self, key: str) -> None:
        self.__delattr__(key)


class TokenRelayApp(Starlette):
    """Starlette, plus the server's own ``send`` kept in the scope, and a router that
    finds the routes of fixed paths by a dict lookup (:class:`_ExactRouter`).

    Every middleware wrapper on ``send`` only looks at ``http.response.start``; a streaming
    response sends its start through them and its body chunks (one per upstream read)
    straight to the server, which saves a coroutine call per wrapper on the hot path.
    Its body runs here, after the middleware stack has returned (see ``Deferred``).
    """

    def __init__(self, *, routes: list[BaseRoute], lifespan: Lifespan[Starlette],
                 **kwargs: Any) -> None:
        super().__init__(routes=routes, lifespan=lifespan, **kwargs)
        self.state = _AppState()
        self.router = _ExactRouter(routes, lifespan=lifespan)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        deferred = None
        if scope["type"] == "http":
            scope[DEFERRED] = deferred = Deferred(send)
        # Starlette.__call__ inlined: one coroutine frame less under every request (each
        # resumption of the response's task passes through all of them).
        scope["app"] = self
        if self.middleware_stack is None:
            self.middleware_stack = self.build_middleware_stack()
        try:
            await self.middleware_stack(scope, receive, send)
            if deferred is not None and deferred.body is not None:
                # Deferred.run inlined: this frame waits under every open stream anyway.
                try:
                    await deferred.body()
                finally:
                    for callback in deferred.after:
                        callback()
        finally:
            # The scope holds the Deferred, which holds the server's send, bound to the
            # request cycle that holds the scope: a reference cycle per request, which
            # only the garbage collector would free (and its young-generation count
            # grows with every such object: more collections, each with more survivors).
            scope.pop(DEFERRED, None)


def create_app(settings: Settings | None = None) -> Starlette:
    """Build the tokenrelay ASGI app. Settings default to :func:`load_settings`."""
    settings = settings or load_settings()
    routes: list[BaseRoute] = [
        Route("/", index, methods=["GET"]),
        Route("/healthz", health, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        *chat.routes,
        *streams.routes,
        *openai.routes,
        *responses.routes,
        *conversations.routes,
        Mount("/static", StaticFiles(directory=WEB_DIR), name="static"),
    ]
    middleware = [
        Middleware(AccessLogMiddleware, max_headers=settings.max_headers),
        Middleware(GuardMiddleware, allowed_hosts=settings.allowed_hosts,
                   bind_host=settings.host, cors_origins=settings.cors_origins),
    ]
    if "*" in settings.allowed_hosts:
        log.warning("allowed_hosts is '*': any Host is served, so a web page can reach this "
                    "gateway through DNS rebinding; list the gateway's names instead")
    if settings.cors_origins:
        middleware.append(Middleware(CORSMiddleware, **cors_options(settings.cors_origins)))
    if settings.api_keys or settings.trusted_user_header:
        # Without either it would pass every request through unchanged.
        middleware.append(Middleware(
            AuthMiddleware, keys=settings.api_keys,
            trusted_header=settings.trusted_user_header,
            trusted_proxies=settings.trusted_proxies, admin_keys=settings.admin_keys))
    app = TokenRelayApp(
        routes=routes,
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            TokenRelayError: _handle_ours,
            HTTPException: _handle_http,
            Exception: _handle_unexpected,
        },
    )
    app.state.settings = settings
    app.state.auth_required = bool(settings.api_keys or settings.trusted_user_header)
    app.state.announce_providers = False  # `tokenrelay serve` turns it on
    app.state.metrics = Metrics()
    return app
