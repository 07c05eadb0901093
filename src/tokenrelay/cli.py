"""The ``tokenrelay`` command: a thin shell over the library.

    tokenrelay serve [--host H] [--port P] [--config FILE] [--workers N]
    tokenrelay simulate [--host H] [--port P] [--speed X]
    tokenrelay chat [--url URL] [--model M] "question"
    tokenrelay bench --model A --model B ...   (see bench/ for the gateway benchmark)
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import Any

from tokenrelay import __version__
from tokenrelay.errors import ConfigError


def _is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tokenrelay.config import load_settings

    overrides: dict[str, Any] = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    try:
        settings = load_settings(args.config, **overrides)
    except ConfigError as exc:
        print(f"tokenrelay: {exc.message}", file=sys.stderr)
        return 2
    if not _is_loopback(settings.host) and not (settings.api_keys
                                                or settings.trusted_user_header):
        print(
            f"tokenrelay: WARNING: listening on {settings.host} with no client API keys: "
            "anyone who can reach this port can use your upstream keys.",
            file=sys.stderr,
        )
    if args.workers > 1:
        problem = _workers_problem(settings)
        if problem:
            print(f"tokenrelay: {problem}", file=sys.stderr)
            return 2
    from tokenrelay.logs import configure_logging

    configure_logging(settings.log_level, json_lines=settings.log_json,
                      secrets=settings.secrets)
    kwargs: dict[str, Any] = dict(
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        # httptools, lighter per connection and telling streams of a disconnect directly.
        http="tokenrelay.protocol:StreamingHttpToolsProtocol",
        log_level=settings.log_level,
        access_log=False,
        # Nothing in tokenrelay reads the client address or scheme that uvicorn's
        # X-Forwarded-* middleware rewrites, and that wrapper's frame stays alive under
        # every open stream (~0.4 KB each; bench/memory_probe.py).
        proxy_headers=False,
        # 10,000 idle SSE streams are normal for a relay: a burst of connects must not
        # overflow uvicorn's default accept queue of 2048 (the kernel caps it at somaxconn).
        backlog=4096,
    )
    if args.workers > 1:
        import asyncio
        import os

        # Each worker process imports the factory and reads the same environment, so the
        # config file goes there too; the schema is migrated once, here, not by N workers
        # racing on an empty database.
        if args.config:
            os.environ["TOKENRELAY_CONFIG"] = os.path.abspath(args.config)
        asyncio.run(_migrate(settings))
        uvicorn.run("tokenrelay.app:create_app", factory=True, workers=args.workers,
                    timeout_graceful_shutdown=settings.drain_s, **kwargs)
    else:
        from tokenrelay.app import create_app

        print(
            f"tokenrelay {__version__} on http://{settings.host}:{settings.port}/"
            + ("  (built-in simulator: no real model)" if "simulator" in settings.providers
               else ""),
            file=sys.stderr,
        )
        from tokenrelay.server import serve

        serve(create_app(settings), settings.drain_s, **kwargs)
    return 0


def _workers_problem(settings: Any) -> str | None:
    """Why ``--workers N`` cannot run with these settings, or None."""
    if settings.journal_url.startswith("memory"):
        return "--workers > 1 needs a shared journal: set TOKENRELAY_REDIS_URL."
    if settings.instance_id:
        # Workers sharing one id would mark each other's live answers as interrupted
        # when one of them restarts (see tokenrelay.store.sql).
        return ("--workers > 1 gives every worker its own instance id: unset "
                "TOKENRELAY_INSTANCE_ID (or run one instance per id).")
    return None


async def _migrate(settings: Any) -> None:
    """Bring the database schema up to date (before the workers start)."""
    if not settings.database_url or settings.database_url == "none":
        return
    from tokenrelay.store import open_store

    store = open_store(settings.database_url)
    await store.start()
    await store.aclose()


def cmd_simulate(args: argparse.Namespace) -> int:
    from tokenrelay.simulator import run_simulator

    print(f"tokenrelay simulator on http://{args.host}:{args.port}/v1", file=sys.stderr)
    run_simulator(args.host, args.port, speed=args.speed)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    import asyncio

    from tokenrelay.terminal import chat_once

    return asyncio.run(chat_once(args.url, args.model, " ".join(args.prompt), args.api_key))


def cmd_bench(args: argparse.Namespace) -> int:
    import asyncio

    from tokenrelay.modelbench import run_model_bench

    return asyncio.run(run_model_bench(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenrelay", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"tokenrelay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway and the chat page")
    serve.add_argument("--host", default=None, help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8000)")
    serve.add_argument("--config", default=None, help="TOML config file")
    serve.add_argument("--workers", type=int, default=1,
                       help="worker processes (needs TOKENRELAY_REDIS_URL when > 1)")
    serve.set_defaults(func=cmd_serve)

    sim = sub.add_parser("simulate", help="run the built-in OpenAI-compatible simulator")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=9000)
    sim.add_argument("--speed", type=float, default=1.0, help="speed multiplier")
    sim.set_defaults(func=cmd_simulate)

    chat = sub.add_parser("chat", help="ask a question through a running gateway")
    chat.add_argument("prompt", nargs="+")
    chat.add_argument("--url", default="http://127.0.0.1:8000")
    chat.add_argument("--model", default=None)
    chat.add_argument("--api-key", default=None)
    chat.set_defaults(func=cmd_chat)

    bench = sub.add_parser("bench", help="compare models through the gateway")
    bench.add_argument("--model", action="append", default=[], dest="models")
    bench.add_argument("--url", default=None,
                       help="a running gateway (default: start one in-process)")
    bench.add_argument("--requests", type=int, default=5)
    bench.add_argument("--concurrency", type=int, default=2)
    bench.add_argument("--prompt", default="Explain server-sent events in two paragraphs.")
    bench.add_argument("--max-tokens", type=int, default=200)
    bench.add_argument("--out", default="model-bench.png", help="chart file (.png or .svg)")
    bench.add_argument("--json", default=None, help="also write the results as JSON")
    bench.add_argument("--api-key", default=None)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))
