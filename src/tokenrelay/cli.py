"""The tokenrelay command: a thin shell over the library (parse, build settings, call).

    tokenrelay serve [--host H] [--port P] [--config FILE] [--workers N]
    tokenrelay chat [--url URL] [--model M] [--no-history] ["question"]
    tokenrelay doctor [--config FILE | --url URL [--api-key-env VAR]] [--model M]
    tokenrelay simulate [--host H] [--port P] [--speed X]
    tokenrelay bench --model A --model B ...   (see bench/ for the gateway benchmark)
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import Any

from tokenrelay.errors import ConfigError
from tokenrelay.version import __version__


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
        from tokenrelay.app import announce_providers

        asyncio.run(announce_providers(settings))  # once, not per worker
        # uvicorn annotates the timeout int, but hands it to asyncio.timeout: a float works.
        uvicorn.run("tokenrelay.app:create_app", factory=True, workers=args.workers,
                    timeout_graceful_shutdown=settings.drain_s,  # type: ignore[arg-type]
                    **kwargs)
    else:
        from tokenrelay.app import create_app

        print(
            f"tokenrelay {__version__} on http://{settings.host}:{settings.port}/"
            + ("  (built-in simulator: no real model)" if "simulator" in settings.providers
               else ""),
            file=sys.stderr,
        )
        from tokenrelay.server import serve

        app = create_app(settings)
        app.state.announce_providers = True
        serve(app, settings.drain_s, **kwargs)
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
    import os

    from tokenrelay.terminal import run_chat

    prompt = " ".join(args.prompt) if args.prompt else None
    api_key = args.api_key or os.environ.get("TOKENRELAY_API_KEY") or None
    return run_chat(args.url, args.model, prompt, api_key, history=not args.no_history)


def cmd_doctor(args: argparse.Namespace) -> int:
    import asyncio

    from tokenrelay.config import Provider, load_settings

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"tokenrelay: {exc.message}", file=sys.stderr)
        return 2
    if args.url:
        import os

        key = None
        if args.api_key_env:
            key = os.environ.get(args.api_key_env) or None
            if key is None:
                print(f"tokenrelay: --api-key-env names {args.api_key_env!r}, which is not set.",
                      file=sys.stderr)
                return 2
        providers = {"url": Provider("url", args.url.rstrip("/"), api_key=key)}
    else:
        providers = dict(settings.providers)
    return asyncio.run(_doctor(settings, providers, args.model, args.timeout))


async def _doctor(settings: Any, providers: dict[str, Any], model: str | None,
                  timeout: float) -> int:
    import contextlib

    from tokenrelay.config import SIMULATOR
    from tokenrelay.diagnose import check_provider, doctor_settings, render
    from tokenrelay.errors import redact
    from tokenrelay.httpclient import Pool
    from tokenrelay.upstream import UpstreamClient

    checked = doctor_settings(settings, providers)
    async with contextlib.AsyncExitStack() as stack:
        base_urls = {}
        if SIMULATOR in providers:
            from tokenrelay.app import _simulator_server

            print("no upstream configured: checking the built-in simulator "
                  "(set TOKENRELAY_UPSTREAM_URL, --config or --url for a real provider)")
            base_urls[SIMULATOR] = await stack.enter_async_context(
                _simulator_server(settings.simulator_speed))
        pool = Pool(keepalive_s=5.0)
        stack.push_async_callback(pool.aclose)
        client = UpstreamClient(checked, pool, base_urls)
        reports = [await check_provider(client, p, model, timeout)
                   for p in checked.providers.values()]
    print(redact(render(reports), checked.secrets))
    return 1 if any(r.failed for r in reports) else 0


def cmd_bench(args: argparse.Namespace) -> int:
    import asyncio
    import os

    from tokenrelay.modelbench import run_model_bench

    args.api_key = args.api_key or os.environ.get("TOKENRELAY_API_KEY") or None
    return asyncio.run(run_model_bench(args))


UPSTREAM_HELP = """\
where answers come from (read by serve, doctor and bench):
  TOKENRELAY_UPSTREAM_URL      an OpenAI-compatible base URL, e.g. https://api.openai.com/v1
                               or http://127.0.0.1:11434/v1 (any model name goes there)
  TOKENRELAY_UPSTREAM_API_KEY  its API key (never logged or shown)
  TOKENRELAY_DEFAULT_MODEL     the model the page and tokenrelay chat pick first
  TOKENRELAY_CONFIG            a TOML file with [providers.*] and [models.*] (as --config)
  With none of them, the built-in simulator answers (simulated models, no real LLM).
  Other settings: TOKENRELAY_DATABASE_URL, TOKENRELAY_REDIS_URL, TOKENRELAY_API_KEYS, ...
  (see the README's Configuration section).
"""

DESCRIPTION = """\
tokenrelay: a streaming gateway and web chat for OpenAI-compatible LLM APIs.

Answers stream token by token, survive reloads and dropped connections, and Stop really
stops the upstream. Start with "tokenrelay serve" and open the page it prints.
"""

COMMANDS = {
    "serve": "Run the gateway and the chat page (http://127.0.0.1:8000/ by default).",
    "chat": "Talk to a running gateway from the terminal: interactive with no prompt, "
            "one answer with a prompt (or stdin).",
    "doctor": "Check each upstream (DNS, connect, TLS, /models, one streamed answer) and "
              "say what to fix.",
    "simulate": "Run the built-in OpenAI-compatible simulator on its own port.",
    "bench": "Compare models through the gateway (TTFT, tokens/s) and draw a chart.",
}


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep our line breaks in descriptions and epilogs; show defaults where they help."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if (text and "%(default)" not in text and action.default not in (None, False)
                and action.default is not argparse.SUPPRESS and action.option_strings
                and not isinstance(action.default, list)):
            text += " (default: %(default)s)"
        return text


def _sub(sub: Any, name: str, epilog: str | None = None) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(
        name, help=COMMANDS[name], description=COMMANDS[name], epilog=epilog,
        formatter_class=_Formatter)
    return parser


def build_parser() -> argparse.ArgumentParser:
    epilog = UPSTREAM_HELP + "\nRun \"tokenrelay COMMAND --help\" for a command's options."
    parser = argparse.ArgumentParser(prog="tokenrelay", description=DESCRIPTION, epilog=epilog,
                                     formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"tokenrelay {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                title="commands", help="what to do (each described below)")

    serve = _sub(sub, "serve", UPSTREAM_HELP)
    serve.add_argument("--host", default=None,
                       help="address to listen on (default 127.0.0.1; anything else needs "
                            "client API keys, TOKENRELAY_API_KEYS)")
    serve.add_argument("--port", type=int, default=None, help="port to listen on (default 8000)")
    serve.add_argument("--config", default=None, metavar="FILE",
                       help="TOML config file with providers and models (or TOKENRELAY_CONFIG)")
    serve.add_argument("--workers", type=int, default=1, metavar="N",
                       help="worker processes (more than 1 needs TOKENRELAY_REDIS_URL)")
    serve.set_defaults(func=cmd_serve)

    chat = _sub(sub, "chat", CHAT_EPILOG)
    chat.add_argument("prompt", nargs="*",
                      help="the question; without it: an interactive session on a terminal, "
                           "or the question read from stdin")
    chat.add_argument("--url", default="http://127.0.0.1:8000",
                      help="the gateway's address")
    chat.add_argument("--model", default=None,
                      help="model to ask (default: the gateway's default model)")
    chat.add_argument("--api-key", default=None,
                      help="the gateway's client API key (or TOKENRELAY_API_KEY)")
    chat.add_argument("--no-history", action="store_true",
                      help="keep these answers out of the page's history and /api/stats")
    chat.set_defaults(func=cmd_chat)

    doctor = _sub(sub, "doctor", DOCTOR_EPILOG)
    doctor.add_argument("--config", default=None, metavar="FILE",
                        help="TOML config file, as for serve (or TOKENRELAY_CONFIG)")
    doctor.add_argument("--url", default=None,
                        help="check this base URL instead of the configured providers")
    doctor.add_argument("--api-key-env", default=None, metavar="VAR",
                        help="with --url: the environment variable holding its API key")
    doctor.add_argument("--model", default=None,
                        help="model for the test answer (default: the configured default, "
                             "else the first the upstream lists)")
    doctor.add_argument("--timeout", type=float, default=15.0, metavar="S",
                        help="seconds allowed for each request")
    doctor.set_defaults(func=cmd_doctor)

    sim = _sub(sub, "simulate")
    sim.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sim.add_argument("--port", type=int, default=9000, help="port to listen on")
    sim.add_argument("--speed", type=float, default=1.0,
                     help="multiplies every model's token rate (2 = twice as fast)")
    sim.set_defaults(func=cmd_simulate)

    bench = _sub(sub, "bench", "Its requests are kept out of the page's history and /api/stats.")
    bench.add_argument("--model", action="append", default=[], dest="models", metavar="MODEL",
                       help="a model to compare (repeat for several)")
    bench.add_argument("--url", default=None,
                       help="a running gateway (default: start one in-process)")
    bench.add_argument("--requests", type=int, default=5, metavar="N",
                       help="answers per model")
    bench.add_argument("--concurrency", type=int, default=2, metavar="N",
                       help="answers in flight at once")
    bench.add_argument("--prompt", default="Explain server-sent events in two paragraphs.",
                       help="the question every request asks")
    bench.add_argument("--max-tokens", type=int, default=200, metavar="N",
                       help="max_tokens of each request")
    bench.add_argument("--out", default="model-bench.png", metavar="FILE",
                       help="chart file (.png or .svg)")
    bench.add_argument("--json", default=None, metavar="FILE",
                       help="also write the results as JSON")
    bench.add_argument("--api-key", default=None,
                       help="the gateway's client API key (or TOKENRELAY_API_KEY)")
    bench.set_defaults(func=cmd_bench)
    return parser


CHAT_EPILOG = """\
interactive commands: /model NAME, /new, /help, /quit
  Ctrl-C during an answer stops it (on the gateway too); Ctrl-C again, or Ctrl-D, quits.
examples:
  tokenrelay chat                              an interactive session
  tokenrelay chat "What is SSE?"               one answer, then exit
  echo "What is SSE?" | tokenrelay chat        the question from stdin
"""

DOCTOR_EPILOG = """\
Exit status 0 when every provider can answer, 1 when one cannot (each failure gets a line
saying what to do). Uses the same configuration and environment as serve.
examples:
  tokenrelay doctor
  tokenrelay doctor --url http://127.0.0.1:11434/v1 --model llama3.2
  tokenrelay doctor --url https://api.openai.com/v1 --api-key-env OPENAI_API_KEY
"""


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))
